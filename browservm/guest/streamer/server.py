"""The streamer process: the display captured once, a :class:`~.viewer.Viewer` per peer, the channel served
on a unix socket, and the viewers' input injected into the display."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel

from browservm import protocol
from browservm.guest.capture import CaptureUnavailable, VideoSource, create_source
from browservm.guest.screen_size import ScreenSizer
from browservm.guest.streamer.aiortc_patches import restrict_host_addresses
from browservm.guest.streamer.loopback import (
    drop_non_loopback_candidates,
    is_loopback_candidate,
    is_loopback_ice_server,
    is_loopback_only,
)
from browservm.guest.streamer.options import StreamerOptions
from browservm.guest.streamer.viewer import Viewer
from browservm.guest.xinput import ClipboardBridge, InputHandler, InputUnavailable, XInput

log = logging.getLogger("browservm.streamer")

FIRST_FRAME_TIMEOUT_S = 5.0
"""How long ``auto`` waits for pixelflux's first frame before it falls back to x11grab."""
WATCHDOG_INTERVAL_S = 1.0
DRAIN_S = 1.0
"""How long a failing streamer waits for its ``failed`` state to reach its clients."""


class Streamer:
    def __init__(self, options: StreamerOptions) -> None:
        self.options = options
        self.state: protocol.ServiceStateName = "starting"
        self.detail = ""
        self.source: VideoSource | None = None
        self.viewers: dict[str, Viewer] = {}
        self._clients: set[protocol.Peer] = set()
        self._stop = asyncio.Event()
        self._input: InputHandler | None = None
        self._xinput: XInput | None = None
        self._clipboard: ClipboardBridge | None = None
        self._server: asyncio.Server | None = None
        self._sizer: ScreenSizer | None = None
        self._wanted_size: tuple[int, int] | None = None
        self._resizing: asyncio.Task[None] | None = None
        self.loopback_only = is_loopback_only(options.host_addresses)
        """Restricted to loopback: remote candidates and ICE servers elsewhere are ignored, so that no
        packet leaves loopback (test beds whose rules forbid any other traffic)."""
        self.ice_servers = self._usable(options.ice_servers)

    def _usable(self, servers: list[protocol.IceServer]) -> list[protocol.IceServer]:
        usable = [s for s in servers if not self.loopback_only or is_loopback_ice_server(s)]
        if len(usable) < len(servers):
            log.warning(
                "ignoring %d ICE server(s) off loopback: the streamer gathers on loopback only",
                len(servers) - len(usable),
            )
        return usable

    # ------------------------------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Serve until stopped; the exit status is 0 on a requested stop, 1 when the capture failed."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        if self.options.host_addresses:
            restrict_host_addresses(self.options.host_addresses)
        self.options.socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve_client, path=str(self.options.socket))
        os.chmod(self.options.socket, 0o600)
        status = 0
        try:
            try:
                self._start_sizer()
                await self._start_capture()
                self._start_input()
                self._set_state("ready")
            except CaptureUnavailable as exc:
                log.error("%s", exc)
                self._set_state("failed", str(exc))
                await self._drain_clients()
                return 1
            stop = asyncio.create_task(self._stop.wait())
            watchdog = asyncio.create_task(self._watch_capture())
            done, _ = await asyncio.wait({stop, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            for task in (stop, watchdog):
                task.cancel()
            if watchdog in done and not watchdog.cancelled() and watchdog.exception() is None:
                status = 1
            if self.state == "failed":  # a capture that did not start again after a resize
                status = 1
        finally:
            await self._shutdown()
        return status

    def _start_sizer(self) -> None:
        if self.options.bounds is None:
            return
        try:
            self._sizer = ScreenSizer(self.options.capture.display)
        except Exception as exc:  # no RandR, or no display: the screen keeps its size
            log.warning("the screen will not follow viewers' sizes: %s", exc)

    async def _start_capture(self) -> None:
        config = self.options.capture
        if self._sizer is not None:
            # A streamer started again finds the screen at the size the last viewer asked for.
            width, height = self._sizer.size()
            config = replace(config, width=width, height=height)
        kind = self.options.capture_kind
        kinds: list[Literal["pixelflux", "x11grab"]] = ["pixelflux", "x11grab"] if kind == "auto" else [kind]
        errors = []
        for kind in kinds:
            source = create_source(kind, config)
            started = time.monotonic()
            try:
                await source.start()
                try:
                    await asyncio.wait_for(source.first_frame.wait(), FIRST_FRAME_TIMEOUT_S)
                except TimeoutError:
                    raise CaptureUnavailable(
                        f"{kind} produced no frame within {FIRST_FRAME_TIMEOUT_S:.0f} s"
                    ) from None
            except CaptureUnavailable as exc:
                source.stop()
                errors.append(str(exc))
                log.warning("capture %s unavailable: %s", kind, exc)
                continue
            log.info(
                "capturing %s with %s (%s %dx%d@%d), first frame after %.0f ms",
                config.display,
                kind,
                config.codec,
                config.width,
                config.height,
                config.fps,
                (time.monotonic() - started) * 1000,
            )
            self.source = source
            return
        raise CaptureUnavailable("no capture source works: " + "; ".join(errors))

    def _start_input(self) -> None:
        loop = asyncio.get_running_loop()
        display = self.options.capture.display
        try:
            self._xinput = XInput(display)
        except InputUnavailable as exc:
            log.warning("input disabled: %s", exc)
            return
        try:

            def on_remote_copy(text: str) -> None:  # the clipboard bridge's thread
                loop.call_soon_threadsafe(self._remote_clipboard, text)

            self._clipboard = ClipboardBridge(display, on_remote_copy)
        except InputUnavailable as exc:
            log.warning("clipboard disabled: %s", exc)
        self._input = InputHandler(self._xinput, self._clipboard, on_resize=self._resize_soon)

    # ------------------------------------------------------------------------------------------ screen size

    def _resize_soon(self, width: int, height: int) -> None:
        """A viewer's area settled at ``width`` x ``height``: the screen follows, within its bounds. The
        last request wins; one resize runs at a time."""
        if self._sizer is None or self.options.bounds is None:
            return
        self._wanted_size = self.options.bounds.fit(width, height)
        if self._resizing is None or self._resizing.done():
            self._resizing = asyncio.create_task(self._resize(), name="resize")

    async def _resize(self) -> None:
        while self._wanted_size is not None and self.source is not None and self._sizer is not None:
            width, height = self._wanted_size
            self._wanted_size = None
            if (width, height) == (self.source.config.width, self.source.config.height):
                continue
            started = time.monotonic()
            try:
                width, height = await asyncio.to_thread(self._sizer.resize, width, height)
                await self.source.resize(width, height)
            except CaptureUnavailable as exc:
                log.error("the capture did not start again at %dx%d: %s", width, height, exc)
                self._set_state("failed", str(exc))
                self._stop.set()  # the supervisor starts a streamer that captures the screen as it is
                return
            except Exception:
                log.warning("resizing the screen to %dx%d failed", width, height, exc_info=True)
                continue
            log.info("screen resized to %dx%d in %.0f ms", width, height, (time.monotonic() - started) * 1000)

    async def _watch_capture(self) -> None:
        """Returns (ending the process with status 1) when the capture dies, so the supervisor restarts us."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            failure = self.source.failure() if self.source else None
            if self.source is not None:
                log.debug(
                    "capture %s: %d frames, %d viewers, %d kbit/s target",
                    self.source.name,
                    self.source.frames,
                    self.source.viewers,
                    self.source.bitrate_kbps,
                )
            if failure:
                log.error("%s", failure)
                self._set_state("failed", failure)
                await self._drain_clients()
                return

    async def _shutdown(self) -> None:
        if self._resizing is not None:
            self._resizing.cancel()
        for peer_id in list(self.viewers):
            await self._close_peer(peer_id, notify=False)
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            await client.close()
        if self.source is not None:
            self.source.stop()
        if self._clipboard is not None:
            self._clipboard.close()
        if self._xinput is not None:
            self._xinput.close()
        if self._sizer is not None:
            self._sizer.close()
        self.options.socket.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ channel

    def _set_state(self, state: protocol.ServiceStateName, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self._broadcast(self._state_message())

    def _state_message(self) -> protocol.ServiceState:
        return protocol.ServiceState(service="streamer", state=self.state, detail=self.detail)

    def _broadcast(self, message: BaseModel) -> None:
        for client in list(self._clients):
            client.send(message)

    async def _drain_clients(self) -> None:
        for client in list(self._clients):
            await client.close(flush_s=DRAIN_S)

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each request is answered in its own task: an offer takes a while (ICE gathering) and must not
        # hold up a candidate or a close for another viewer.
        client = protocol.Peer(
            reader,
            writer,
            name="agent",
            handlers={
                protocol.Signal: self.signal,
                protocol.StreamStatus: self._status,
                protocol.Shutdown: self._shutdown_request,
            },
        )
        self._clients.add(client)
        client.send(self._state_message())
        try:
            await client.closed.wait()
        finally:
            self._clients.discard(client)
        if client.why_closed.startswith("protocol error"):
            log.warning("channel client dropped: %s", client.why_closed)

    async def _status(self, request: protocol.StreamStatus) -> protocol.StreamerStatus:
        return self.status()

    async def _shutdown_request(self, request: protocol.Shutdown) -> protocol.Ack:
        self._stop.set()
        return protocol.Ack()

    def status(self) -> protocol.StreamerStatus:
        source = self.source
        return protocol.StreamerStatus(
            state=self.state,
            capture=source.name if source else None,
            codec=self.options.capture.codec,
            viewers=len(self.viewers),
            frames=source.frames if source else 0,
            bytes=source.bytes if source else 0,
            bitrate_kbps=source.bitrate_kbps if source else None,
            width=source.config.width if source else None,
            height=source.config.height if source else None,
        )

    # ------------------------------------------------------------------------------------------ signaling

    async def signal(self, message: protocol.Signal) -> protocol.Answer:
        if message.kind == "offer":
            if not message.sdp:
                raise protocol.RequestError("bad_request", "an offer needs its sdp")
            servers = self.ice_servers if message.ice_servers is None else self._usable(message.ice_servers)
            return protocol.Answer(
                sdp=await self._offer(message.peer_id, message.sdp, servers, message.media)
            )
        if message.kind == "candidate":
            await self._candidate(message.peer_id, message.candidate)
            return protocol.Answer()
        if message.kind == "close":
            await self._close_peer(message.peer_id, notify=True)
            return protocol.Answer()
        raise protocol.RequestError("bad_request", "the streamer answers offers; it never takes an answer")

    async def _offer(
        self,
        peer_id: str,
        sdp: str,
        ice_servers: list[protocol.IceServer],
        media: protocol.MediaMapping | None = None,
    ) -> str:
        if self.source is None or self.state != "ready":
            raise protocol.RequestError(
                "not_ready", f"the streamer is {self.state}; retry once it reports ready"
            )
        if peer_id in self.viewers:  # ICE restart / reconnect: the new offer replaces the old peer
            await self._close_peer(peer_id, notify=False)
        viewer = Viewer(
            peer_id,
            self.source,
            self.options.capture.codec,
            ice_servers,
            on_state=self._viewer_state,
            on_input=self._viewer_input,
            on_estimate=self._follow_estimates,
            media=media if not self.loopback_only or self._on_loopback(media) else None,
        )
        self.viewers[peer_id] = viewer
        try:
            return await viewer.answer(drop_non_loopback_candidates(sdp) if self.loopback_only else sdp)
        except protocol.RequestError:
            await self._close_peer(peer_id, notify=False)
            raise
        except Exception as exc:
            await self._close_peer(peer_id, notify=False)
            raise protocol.RequestError("bad_offer", f"cannot answer the offer: {exc}") from exc

    @staticmethod
    def _on_loopback(media: protocol.MediaMapping | None) -> bool:
        """Whether a mapping stays on loopback (a loopback-only test bed takes no other)."""
        return media is not None and is_loopback_only([media.public_ip, media.guest_address])

    async def _candidate(self, peer_id: str, candidate: dict[str, Any] | None) -> None:
        viewer = self.viewers.get(peer_id)
        if viewer is None:
            raise protocol.RequestError("unknown_peer", f"no peer {peer_id!r}; send its offer first")
        line = (candidate or {}).get("candidate") or ""
        if not line:
            return  # end-of-candidates: aiortc needs no notice
        if self.loopback_only and not is_loopback_candidate(line):
            log.debug("peer %s: ignoring a candidate off loopback: %s", peer_id, line[:120])
            return
        await viewer.add_candidate(line, candidate or {})

    async def _viewer_state(self, viewer: Viewer, state: str) -> None:
        if self.viewers.get(viewer.peer_id) is not viewer:
            return  # a replaced peer: its successor speaks for this peer_id
        log.info("viewer %s: %s", viewer.peer_id, state)
        if state == "connected":
            self._broadcast(protocol.SignalEvent(peer_id=viewer.peer_id, kind="connected"))
        elif state in ("failed", "closed"):
            await self._close_peer(viewer.peer_id, notify=True)

    def _viewer_input(self, channel: Any, raw: str | bytes) -> None:
        if self._input is None:
            return
        reply = self._input.handle(raw)
        if reply is None and self.source is not None:
            self.source.note_input()  # the page answers input: stream its answer at once
        elif reply is not None and channel.readyState == "open":
            channel.send(reply)

    def _follow_estimates(self) -> None:
        estimates = [v.estimate_kbps for v in self.viewers.values() if v.estimate_kbps]
        if estimates and self.source is not None:
            self.source.set_bitrate(min(estimates))  # one encode serves all: the slowest path sets the rate

    async def _close_peer(self, peer_id: str, notify: bool) -> None:
        viewer = self.viewers.pop(peer_id, None)
        if viewer is None:
            return
        if self._input is not None:
            self._input.release_all()  # a viewer that vanished mid-drag must not leave keys held
        await viewer.close()
        self._follow_estimates()
        if notify:
            self._broadcast(protocol.SignalEvent(peer_id=peer_id, kind="closed"))

    def _remote_clipboard(self, text: str) -> None:
        message = json.dumps({"t": "clipboard", "text": text})
        for viewer in self.viewers.values():
            viewer.send(message)
