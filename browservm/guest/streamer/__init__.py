"""The WebRTC streamer: one process per guest display, one RTCPeerConnection per viewer.

Run::

    python -m browservm.guest.streamer --display :N --socket PATH --width W --height H --fps F \\
        --codec h264|vp8 --min-kbps A --max-kbps B --ice-servers JSON [--host-addresses 127.0.0.1] \\
        [--capture auto|pixelflux|x11grab]

``--host-addresses`` makes ICE gather host candidates on exactly those addresses. When all of them are
loopback, the streamer also ignores remote candidates (in the offer and trickled) and ICE servers that are
not on loopback, so a loopback-only test bed never sends a packet elsewhere.

It listens on the unix socket ``PATH`` and speaks :mod:`browservm.protocol` frames. On every connection
it first sends ``ServiceState(service="streamer")``: ``starting`` until a first encoded frame exists, then
``ready`` (also pushed to every connection when it turns ready), or ``failed`` with the reason.

Requests it answers (each through a :class:`~browservm.protocol.Peer`, with its reply model):

* ``Signal(kind="offer")``: the viewer's offer (a recvonly video transceiver and a data channel named
  ``input``). The :class:`~browservm.protocol.Answer` carries the answer SDP, complete with all candidates
  (aiortc gathers before answering). An offer for a ``peer_id`` that exists replaces that peer (ICE
  restart or reconnect).
* ``Signal(kind="candidate")``: a trickled remote candidate, applied to that peer; end-of-candidates
  (``candidate`` ``None`` or empty) is accepted and ignored.
* ``Signal(kind="close")``: ends that viewer's peer connection.
* ``StreamStatus``: a :class:`~browservm.protocol.StreamerStatus` (frames and bytes encoded since start).
* ``Shutdown``: replies, then stops the process.

Events it sends to every connection: ``SignalEvent(kind="connected")`` when a viewer's connection state
becomes connected, ``SignalEvent(kind="closed")`` when it fails or closes, and ``ServiceState`` changes.

Capture is pixelflux unless ``--capture x11grab`` (or ``BROWSERVM_STREAMER_CAPTURE=x11grab``) forces the
PyAV fallback; ``auto`` falls back by itself when pixelflux cannot start or yields no frame. The input
data channel's message set is documented in :mod:`browservm.guest.xinput`.

The package holds the process's pieces: :mod:`~.server` (the :class:`~.server.Streamer`: capture,
channel, viewers' registry), :mod:`~.viewer` (one viewer's peer connection), :mod:`~.loopback` (the
loopback ICE policy), :mod:`~.aiortc_patches` (where aiortc's API falls short), :mod:`~.options` (the
command line). Importing the package itself loads none of them: the agent checks for it without aiortc.
"""
