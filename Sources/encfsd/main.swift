print("encfsd")
