"""shout_guard: lower-cases shouted words in completions, streamed or not (an example plugin)."""

import copy
import re
import string

from pluginchain import Needs, Plugin, PluginConfig, PluginContext, PluginData, Stage, StreamMode


class ShoutGuardConfig(PluginConfig):
    min_letters: int = 4  # a run of this many capitals, or more, is a shout


class ShoutGuard(Plugin):
    name = "shout_guard"
    Config = ShoutGuardConfig
    stages = frozenset({Stage.POST_REQUEST})
    supports_parallel = True
    reads_body = True
    suspends = False                         # pure computation: run inline
    streams = frozenset({StreamMode.EVENTS})  # judge a stream event by event

    def __init__(self, config: ShoutGuardConfig, settings):
        super().__init__(config, settings)
        self._shout = re.compile(rf"\b[A-Z]{{{config.min_letters},}}\b")

    def needs(self) -> Needs:
        # Nothing held back by default; execute() holds a capitalised tail while it may grow.
        return Needs(response_body=True, suspends=False, stream=StreamMode.EVENTS, holdback=0)

    def calm(self, text: str) -> str:
        return self._shout.sub(lambda match: match.group().lower(), text)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        if data.event is None:  # a completion that is not streamed: the whole JSON body
            completion = copy.deepcopy(data.json())  # data.json() is shared: change a copy
            for choice in completion.get("choices", []):
                choice["message"]["content"] = self.calm(choice["message"].get("content") or "")
            data.set_json(completion)
            return
        for channel, text in data.texts.items():  # per choice: the text not yet sent
            closing = channel in data.event.ending
            # Capitals at the very end may go on in the next event ("HELL" + "O"): keep them back.
            tail = 0 if closing else len(text) - len(text.rstrip(string.ascii_uppercase))
            head = self.calm(text[: len(text) - tail])
            if head != text[: len(text) - tail]:
                data.set_text(channel, head + text[len(text) - tail:])
            data.hold(channel, tail)
