"""Faces that let other programs use a lamina store as their storage.

``docker``: dockerd's graph-driver plugin protocol (HTTP over a unix socket), so that
``dockerd --experimental -s lamina`` keeps its images and containers in lamina.
``wire`` holds the protocol's exact field names, ``bridge`` the glue between the async
HTTP server and the store's blocking file objects, ``layerlocks`` the per-layer waiting
between concurrent requests, ``cli`` the ``lamina serve docker-plugin`` command.
"""
