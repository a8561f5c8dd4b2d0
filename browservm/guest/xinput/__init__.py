"""Input from a remote viewer into the guest's X display: pointer and keys via XTEST, and the clipboard.

The viewer page sends JSON messages over the WebRTC data channel labelled ``input``; the streamer hands
each one to :meth:`InputHandler.handle`. The message set (``t`` is the discriminator):

=============================================================  ==============================================
message                                                        effect
=============================================================  ==============================================
``{"t":"move","x":int,"y":int}``                               move the pointer (remote screen pixels)
``{"t":"down"|"up","button":1|2|3,"x":int,"y":int}``           press / release a button at x,y (1 left,
                                                               2 middle, 3 right)
``{"t":"wheel","dx":float,"dy":float,"x":int,"y":int}``        scroll at x,y; dx/dy are ``WheelEvent``
                                                               deltas in CSS pixels (``deltaMode`` 0), one
                                                               wheel click per 100 px, remainders carried
``{"t":"key","key":str,"code":str,"down":bool}``               one key transition; ``key``/``code`` are
                                                               ``KeyboardEvent.key``/``.code``. Modifiers
                                                               are their own key events, so ctrl+v works
``{"t":"text","text":str}``                                    type a string (any Unicode; characters the
                                                               keymap lacks are typed through spare
                                                               keycodes remapped on the fly)
``{"t":"clipboard","text":str}``                               set the remote CLIPBOARD and PRIMARY
``{"t":"ping","ts":number}``                                   answered with ``{"t":"pong","ts":same}``
``{"t":"release"}``                                            release every key and button still held
                                                               (sent by a page losing focus)
``{"t":"resize","width":int,"height":int}``                    the viewer's area settled at this size (CSS
                                                               pixels): the screen follows, within bounds
                                                               (:mod:`browservm.guest.screen_size`)
=============================================================  ==============================================

From the remote side the viewer receives ``{"t":"clipboard","text":str}`` whenever the remote CLIPBOARD
changes (XFixes selection notify), and ``{"t":"pong","ts":...}``.

Coordinates are clamped to the screen. Malformed or unknown messages are logged at debug and ignored:
a viewer must never be able to crash the streamer.
"""

from browservm.guest.xinput.clipboard import ClipboardBridge
from browservm.guest.xinput.handler import InputHandler
from browservm.guest.xinput.xtest import InputUnavailable, XInput

__all__ = ["ClipboardBridge", "InputHandler", "InputUnavailable", "XInput"]
