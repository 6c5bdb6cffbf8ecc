"""facelink: edge-to-cloud face recognition.

The device detects and aligns faces and sends a few hundred bytes per face over gRPC; the
cloud decodes, recognises and matches against a gallery. Sub-packages:

    facelink.v1        the wire contract (generated from protos/)
    facelink.runtime   what both ends share: backends, manifests, alignment, detection, codecs
    facelink.edge      the device: capture, detect, align, track, encode, stream
    facelink.cloud     the gRPC service: decode, recognise, gallery, decisions
    facelink.export    training and export (the only place torch lives)
"""

__version__ = "0.1.0"
