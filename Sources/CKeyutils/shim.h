#ifndef ENCFSD_CKEYUTILS_SHIM_H
#define ENCFSD_CKEYUTILS_SHIM_H
#include <keyutils.h>
#endif
