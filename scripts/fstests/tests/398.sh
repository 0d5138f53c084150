#!/usr/bin/env bash
# Port of xfstests generic/398: a consistent encryption policy is enforced within an encrypted
# directory tree. Linking or renaming (also RENAME_EXCHANGE) a regular file, directory or symlink
# into a directory with a different policy fails with EXDEV; FIFOs, sockets and device nodes are
# exempt; without the key, exchanges fail with ENOKEY.
#
# encfsd has no unencrypted directories: the scratch root is encrypted under the random root key,
# so the kernel test's "unencrypted" directory is here a directory that inherits the root's policy
# ("rdir"). Unlike the kernel test, linking and renaming from edir1 into it must therefore fail too.
source "$(dirname "$0")/../common.sh"
_scratch_mkfs_encrypted

# Two directories with policies under two different keys, and one with the root's policy.
edir1=$SCRATCH_MNT/edir1
edir2=$SCRATCH_MNT/edir2
rdir=$SCRATCH_MNT/rdir
mkdir "$edir1" "$edir2" "$rdir"
second_key=$SCRATCH_BASE/second.key
"$ENCFSD" key generate -o "$second_key"
_add_enckey "$SCRATCH_MNT" > /dev/null
second_id=$("$ENCFSD" key add "$SCRATCH_MNT" --key-file "$second_key" | awk '{print $NF}')
_set_encpolicy "$edir1" $TEST_KEY_IDENTIFIER
_set_encpolicy "$edir2" "$second_id"
touch "$edir1/efile1" "$edir2/efile2" "$rdir/rfile"
mkdir "$edir1/edir" "$edir1/sub"
ln -s target "$edir1/elink"

echo -e "\n*** Link encrypted <= encrypted ***"
_run ln "$edir1/efile1" "$edir2/efile1"

echo -e "\n*** Rename encrypted => encrypted ***"
renameat2 "$edir1/efile1" "$edir2/efile1"
echo "# a directory and a symlink"
renameat2 "$edir1/edir" "$edir2/edir"
renameat2 "$edir1/elink" "$edir2/elink"

echo -e "\n\n*** Link root-policy <= encrypted ***"
_run ln "$rdir/rfile" "$edir1/rfile"

echo -e "\n*** Rename root-policy => encrypted ***"
renameat2 "$rdir/rfile" "$edir1/rfile"

echo -e "\n\n*** Link encrypted <= root-policy ***"
_run ln "$edir1/efile1" "$rdir/efile1"

echo -e "\n*** Rename encrypted => root-policy ***"
renameat2 "$edir1/efile1" "$rdir/efile1"

echo -e "\n\n*** Link and rename within one policy (subdirectories inherit it) ***"
_run ln -v "$edir1/efile1" "$edir1/sub/efile1"
renameat2 "$edir1/sub/efile1" "$edir1/sub/moved" && echo "renamed within edir1/sub"
renameat2 -x "$edir1/efile1" "$edir1/sub/moved" && echo "exchanged edir1/efile1 <=> edir1/sub/moved"
rm "$edir1/sub/moved"
echo "# a directory given the same policy separately has the same policy: no EXDEV"
mkdir "$SCRATCH_MNT/edir3"
_set_encpolicy "$SCRATCH_MNT/edir3" $TEST_KEY_IDENTIFIER
_run ln -v "$edir1/efile1" "$SCRATCH_MNT/edir3/efile1"
renameat2 "$SCRATCH_MNT/edir3/efile1" "$SCRATCH_MNT/edir3/efile3"
renameat2 -x "$SCRATCH_MNT/edir3/efile3" "$edir1/sub" && echo "exchanged edir3/efile3 <=> edir1/sub"
renameat2 "$edir1/sub" "$SCRATCH_MNT/edir3/moved" && echo "renamed edir1/sub (now a file) -> edir3/moved"
renameat2 "$SCRATCH_MNT/edir3/efile3" "$edir1/sub" && echo "renamed edir3/efile3 (now a directory) -> edir1/sub"
stat -c '%n: %F' "$edir1/sub" "$SCRATCH_MNT/edir3/moved" | _filter_scratch
rm -r "$SCRATCH_MNT/edir3"

echo -e "\n\n*** Exchange encrypted <=> encrypted ***"
renameat2 -x "$edir1/efile1" "$edir2/efile2"

echo -e "\n*** Exchange root-policy <=> encrypted ***"
renameat2 -x "$rdir/rfile" "$edir1/efile1"

echo -e "\n*** Exchange encrypted <=> root-policy ***"
renameat2 -x "$edir1/efile1" "$rdir/rfile"

echo -e "\n\n*** Special file tests ***"
mkfifo "$edir1/fifo"
renameat2 "$edir1/fifo" "$edir2/fifo"
renameat2 "$edir2/fifo" "$rdir/fifo"
renameat2 "$rdir/fifo" "$edir1/fifo"
mkfifo "$rdir/fifo"
renameat2 -x "$rdir/fifo" "$edir1/fifo"
_run ln -v "$edir1/fifo" "$edir2/fifo"
stat -c '%n: %F, %h links' "$edir1/fifo" "$edir2/fifo" "$rdir/fifo" | _filter_scratch
rm "$edir1/fifo" "$edir2/fifo" "$rdir/fifo"
echo "# a socket"
python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$edir1/sock"
renameat2 "$edir1/sock" "$edir2/sock"
_run ln -v "$edir2/sock" "$rdir/sock"
stat -c '%n: %F, %h links' "$edir2/sock" "$rdir/sock" | _filter_scratch
rm "$edir2/sock" "$rdir/sock"
echo "# device nodes"
mknod "$edir1/chr" c 5 5
renameat2 "$edir1/chr" "$edir2/chr"
mknod "$rdir/blk" b 7 0
renameat2 -x "$edir2/chr" "$rdir/blk"
stat -c '%n: %F' "$edir2/chr" "$rdir/blk" | _filter_scratch
_run ln -v "$edir2/chr" "$edir1/chr"
rm "$edir1/chr" "$edir2/chr" "$rdir/blk"

# Now test that *without* the keys, an exchange (cross rename) cannot move a forbidden file into
# an encrypted directory: it fails with ENOKEY before the policies are compared.
_rm_enckey "$SCRATCH_MNT" $TEST_KEY_IDENTIFIER > /dev/null
_rm_enckey "$SCRATCH_MNT" "$second_id" > /dev/null
_scratch_cycle_mount
efile1=$(find "$edir1" -maxdepth 1 -type f)
efile2=$(find "$edir2" -maxdepth 1 -type f)

echo -e "\n\n*** Exchange encrypted <=> encrypted without key ***"
renameat2 -x "$efile1" "$efile2" | _filter_nokey_names
echo -e "\n*** Exchange encrypted <=> root-policy without key ***"
renameat2 -x "$efile1" "$rdir/rfile" | _filter_nokey_names
