"""What a post_request plugin sees of a streamed response: one server-sent event at a time.

A streamed completion (``content-type: text/event-stream``) is not held back until it ends. The
sidecar reassembles the events from network chunks and runs the chain's post_request plugins on
each, in one of two ways each plugin declares (:attr:`pluginchain.Plugin.streams`, chosen per
config in :meth:`pluginchain.Plugin.needs`):

- :attr:`StreamMode.EVENTS`: ``execute`` runs once per event, with :attr:`PluginData.event` set.
  For OpenAI chat completions, completions and Responses API events the event carries the
  decoded delta text of each :class:`TextChannel` (a choice's content, a tool call's arguments),
  and :attr:`PluginData.texts` gives, per channel, all the text not yet sent to the client, this
  event's delta included. A plugin may rewrite that text (:meth:`PluginData.set_text`) and keep
  some of its end back until later events arrive (``Needs.holdback``, :meth:`PluginData.hold`),
  so that a pattern split over events is still seen whole before any of it leaves.
- :attr:`StreamMode.WHOLE`: ``execute`` runs once, at the end, on the whole stream as the body;
  nothing is sent before (up to ``Needs.stream_limit_bytes``).

A plugin never sees part of a stream as if it were the whole body: in EVENTS mode ``data.body``
is None.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class StreamMode(enum.StrEnum):
    """How a plugin that reads response bodies treats a streamed response."""

    EVENTS = "events"
    """Once per event, with the text of each channel not yet sent."""
    WHOLE = "whole"
    """Once at the end, on the whole stream; the client gets nothing before."""


class TextChannel(NamedTuple):
    """One sequence of text a streamed response writes in order.

    ``kind`` is ``content``, ``refusal`` or ``tool_arguments`` (chat completions), ``text``
    (completions), ``output_text``, ``refusal`` or ``arguments`` (Responses API). ``choice`` is
    the choice index (chat, completions) or the output index (Responses); ``part`` the tool call
    index or the content index.
    """

    kind: str
    choice: int = 0
    part: int = 0


@dataclass(slots=True)
class StreamEvent:
    """One server-sent event of a streamed response, as EVENTS-mode plugins see it."""

    type: str | None
    """The ``event:`` field (the Responses API's event names travel in the data's ``type``)."""
    data: str | None
    """The ``data:`` field, lines joined with ``\\n``; None for an event without one."""
    document: Any = None
    """``data`` decoded as JSON, or None. Read-only: change text through ``set_text``."""
    deltas: Mapping[TextChannel, str] = field(default_factory=dict)
    """The text this event adds, per channel (empty for events that carry no delta)."""
    pending: dict[TextChannel, str] = field(default_factory=dict)
    """Per channel, the text not yet sent, ``deltas`` included; what ``PluginData.texts`` reads."""
    final: bool = False
    """The stream ends with this event: nothing can be held back any more."""
    ending: frozenset[TextChannel] = frozenset()
    """Channels whose text all leaves after this event (their choice finished, or the stream
    ends): what is held back of them goes out now, whatever a plugin holds."""
    holds: dict[TextChannel, int] = field(default_factory=dict)
    """Per channel, the most characters a plugin asked to keep back at this event (``hold``)."""
    replacement: str | None = None
    """New data for an event without deltas (``PluginData.replace_event``)."""
