"""containerd's snapshotter face: ``lamina serve containerd-snapshotter``.

``service`` holds the semantics over a store, ``filters`` containerd's filter syntax,
``server`` the gRPC translation and the socket, ``cli`` the command, ``proto`` the
service's wire description and its generated modules.
"""
