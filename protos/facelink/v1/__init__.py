"""Generated stubs of the facelink.v1 wire contract (see protos/README.md). Do not edit by hand."""
