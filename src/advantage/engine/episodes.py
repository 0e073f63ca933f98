"""Multi-turn episodes (SPEC §7), a sampler like `engine.sampling.SingleTurn`.

`Episodes`: the prompt, then the model's turns and the environment's replies, until the
environment says done, the model ends without acting (no tool call), or a budget ends it
(`max_turns`, `max_episode_tokens`; a per-turn `max_new_tokens` hit without an end). Every turn
generates for the episodes still running in one batch, on either backend.

**Token-exact.** The tokens trained on are the tokens sampled, with the environment's tokens
appended between turns; the history is never re-rendered through the chat template (templates
that rewrite history, e.g. Qwen3's removal of earlier `<think>` blocks, would change tokens).
An environment reply is tokenized alone: with a chat template, as the text the template puts
after an assistant turn's end token for that reply (the "bridge", found once from a dummy
conversation); without one, through `reply_template`. Environment tokens are context: False
in `Rollout.action_mask`, log-prob 0, and out of the loss, every statistic, the KL and the ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .configlib import ConfigError, short
from .environments import (
    REWARD_ARGUMENT,
    EpisodeError,
    append_to_prompt,
    callable_tools,
    env_call,
    is_gym,
)
from .parallel import global_max
from .reward_call import as_float, fits_float32
from .rollout import Rollout, SamplingParams, pad_completions, pad_prompts
from .sampling import Encode, Sampled
from .tools import Toolbox, ToolCallParser, ToolResult

REPLY_FIELDS = ("role", "content", "name")
"""The fields of `rollout.reply_template`: a reply message's."""


def check_reply_template(template: str) -> None:
    """A ConfigError naming `rollout.reply_template` unless it formats a reply message (its
    fields are `REPLY_FIELDS`): checked when the sampler is built, not at the first reply."""
    sample = {f: f for f in REPLY_FIELDS}
    fields = ", ".join("{" + f + "}" for f in REPLY_FIELDS)
    try:
        template.format(**sample)
    except KeyError as e:
        raise ConfigError(
            f"rollout.reply_template: unknown field {{{e.args[0]}}} in {template!r}; the fields "
            f"are {fields} (write a literal brace as {{{{ or }}}})"
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(
            f"rollout.reply_template: {template!r} is not a format string of a reply "
            f"({type(e).__name__}: {e}); the fields are {fields} (write a literal brace as "
            "{{ or }})"
        ) from None


@dataclass
class EpisodeSettings:
    """The budgets and formats of an episode (the `rollout.*` episode fields)."""

    max_turns: int = 4
    """Model turns at most; an episode still acting after the last one is truncated."""
    max_episode_tokens: int | None = None
    """Tokens after the prompt at most, the model's and the environment's (null = no limit)."""
    reply_template: str = "{content}"
    """Without a chat template: how a tool result or an environment reply is written (fields
    `REPLY_FIELDS`; an environment's reply has the name "")."""
    context: int | None = None
    """The model's positions (`max_position_embeddings`): an episode's prompt and tokens never
    go past them; one that reaches them ends, truncated, as at any other budget."""


@dataclass(eq=False)
class _Episode:
    """One episode's state while it runs (the lists grow turn by turn)."""

    index: int
    """Its place in the batch (prompt-major)."""
    row: dict
    prompt_ids: list[int]
    env: object | None = None
    tokens: list[int] = field(default_factory=list)
    actions: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    done: bool = False
    truncated: bool = False
    turns: int = 0
    toolbox: Toolbox | None = None

    def append(self, ids: list[int], action: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.actions += [action] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.rewards += [0.0] * len(ids)


class Episodes:
    """Multi-turn episodes with tools (TRL's `tools=`) or an environment per episode (TRL's
    `environment_factory`: `reset(**row)` and public methods as tools, optional `get_reward()`;
    or gym-style `reset(row)` and `step(message) -> (reply, reward, done)`)."""

    episodic = True

    def __init__(
        self,
        backend,
        tokenizer,
        encode: Encode,
        settings: EpisodeSettings,
        *,
        tools: list[Callable] | None = None,
        environment_factory: Callable | None = None,
        parser: ToolCallParser | None = None,
        tool_timeout: float | None = 10.0,
        tool_max_output: int = 4000,
    ) -> None:
        if not tools and environment_factory is None:
            raise ConfigError("episodes need rollout.tools or rollout.environment")
        if tools and is_gym(environment_factory):  # its step() takes the whole turn
            raise ConfigError(
                "rollout.tools are never called with a gym environment (rollout.environment): "
                "its step() receives the model's whole turn; drop rollout.tools, or give a "
                "TRL-style environment (reset(**row); its public methods are the tools)"
            )
        check_reply_template(settings.reply_template)
        # the tools' schemas and unique names, checked now rather than at the first call
        Toolbox(callable_tools(tools, environment_factory), timeout=None)
        self.backend = backend
        self.tokenizer = tokenizer
        self.encode = encode
        self.settings = settings
        self.tools = list(tools or [])
        self.environment_factory = environment_factory
        self.gym = is_gym(environment_factory)
        self.parser = parser
        self.tool_timeout, self.tool_max_output = tool_timeout, tool_max_output
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    # -- the turn loop ---------------------------------------------------------------------

    def sample(self, rows: list[dict], prompts: list, n: int, params: SamplingParams) -> Sampled:
        """n episodes of each row (prompt-major), run turn by turn until every one has ended."""
        episodes = [
            self._start(i * n + j, rows[i], prompts[i]) for i in range(len(rows)) for j in range(n)
        ]
        # a sharded policy (FSDP2) runs every forward on every rank together: every rank takes
        # a turn while any rank has an episode running (a rank whose episodes have all ended
        # decodes a stand-in row), else one that went on would wait for the others forever
        lockstep = getattr(self.backend, "lockstep", False)
        first = True
        while True:
            running = [e for e in episodes if not e.done]
            if not (global_max(int(bool(running))) if lockstep else running):
                break
            if not running:  # another rank's turn: its forwards need this rank's too
                self.backend.stand_in(self._turn_params(params, 1, lockstep))
                continue
            self._model_turn(running, params, n if first else 1, lockstep)
            first = False
            for e in running:
                if not e.done:
                    self._environment_turn(e)
        return self._collect(episodes)

    def _start(self, index: int, row: dict, prompt) -> _Episode:
        env = None
        if self.environment_factory is not None:
            env = self.environment_factory()
            reset = (lambda: env.reset(row)) if self.gym else (lambda: env.reset(**row))
            first = env_call(env, "reset", index, row, self.tool_timeout, reset)
            if first:  # TRL: appended to the (last user message of the) prompt
                prompt = append_to_prompt(prompt, str(first))
        prompt_ids = self.encode(prompt)
        context = self.settings.context
        if env is not None and context is not None and len(prompt_ids) >= context:
            raise EpisodeError(  # (else a turn of no tokens: a traceback from the decoder)
                f"{type(env).__name__}.reset made the prompt {len(prompt_ids)} tokens long in "
                f"episode {index} (row {short(row)}): the model's max_position_embeddings="
                f"{context} leaves no room for a turn; return a shorter text from reset"
            )
        return _Episode(index=index, row=row, prompt_ids=prompt_ids, env=env)

    def _turn_params(self, params: SamplingParams, budget: int, lockstep: bool) -> SamplingParams:
        """A turn's sampling: at most `budget` new tokens (under lockstep the largest of every
        rank's: the decode steps are taken together), ending at the tool parser's stop texts."""
        budget = global_max(budget) if lockstep else budget
        params = replace(params, max_new_tokens=min(params.max_new_tokens, budget))
        if self.parser is not None and self.parser.stop_strings:
            params = replace(params, stop=[*params.stop, *self.parser.stop_strings])
        return params

    def _model_turn(
        self, running: list[_Episode], params: SamplingParams, n: int, lockstep: bool = False
    ) -> None:
        """One generation for every running episode, in one batch. On the first turn (n > 1)
        the n episodes of a prompt share it: each prompt is prefilled once."""
        budget = max(self._tokens_left(e) for e in running)
        params = self._turn_params(params, budget, lockstep)
        shared = n > 1 and all(
            running[k].prompt_ids == running[k - k % n].prompt_ids for k in range(len(running))
        )
        if shared:
            rollout = self.backend.generate([e.prompt_ids for e in running[::n]], n, params)
        else:
            rollout = self.backend.generate([e.prompt_ids + e.tokens for e in running], 1, params)
        for k, e in enumerate(running):
            keep = rollout.completion_mask[k]
            ids = rollout.completion_ids[k][keep].tolist()
            logprobs = rollout.logprobs[k][keep].tolist() if rollout.logprobs is not None else None
            left = self._tokens_left(e)
            if len(ids) > left:  # the episode's token budget ends inside this turn
                ids, logprobs = ids[:left], None if logprobs is None else logprobs[:left]
                e.truncated = True
            e.append(ids, True, logprobs)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            e.messages.append({"role": "assistant", "content": text})
            e.turns += 1
            if e.truncated or bool(rollout.truncated[k]):
                e.done = e.truncated = True  # a turn cut by a budget ends the episode

    def _environment_turn(self, e: _Episode) -> None:
        """The environment answers the model's last turn (or the episode ends)."""
        text = e.messages[-1]["content"]
        if self.gym:

            def step():
                reply, reward, done = e.env.step(text)  # a malformed tuple: its EpisodeError
                return reply, reward, done

            reply, reward, done = env_call(e.env, "step", e.index, e.row, self.tool_timeout, step)
            if reward is not None:  # on the last token of the turn it answers
                e.rewards[-1] += _step_reward(e, reward)
            if not isinstance(done, (bool, np.bool_)):
                raise EpisodeError(
                    f"environment {type(e.env).__name__}.step returned done={done!r} "
                    f"({type(done).__name__}) in episode {e.index}; expected True or False"
                )
            replies = [] if reply is None else [{"role": "user", "content": str(reply)}]
            if done:
                e.done = True
        else:
            calls = self.parser.parse(text) if self.parser is not None else []
            if not calls:
                e.done = True  # the model ended without acting
                return
            if e.turns >= self.settings.max_turns:
                e.done = e.truncated = True  # it still acts after its last turn: no call runs
                return
            replies = [r.message for r in self._call_tools(e, calls)]
        if e.done:
            return
        if e.turns >= self.settings.max_turns:
            e.done = e.truncated = True  # it still acts after its last turn
            return
        for message in replies:
            e.messages.append(message)
        ids = self._reply_ids(replies)
        left = self._tokens_left(e)
        e.append(ids[:left], False)
        if len(ids) >= left:
            e.done = e.truncated = True

    def _call_tools(self, e: _Episode, calls: list) -> list[ToolResult]:
        """The results of the turn's tool calls, one after the other (an environment's tools
        share its state); a parser's error result passes through."""
        if e.toolbox is None:  # built once per episode: its environment's tools are bound
            e.toolbox = Toolbox(
                callable_tools(self.tools, e.env),
                timeout=self.tool_timeout,
                max_output_chars=self.tool_max_output,
            )
        return [e.toolbox.call(call) for call in calls]

    def _tokens_left(self, e: _Episode) -> int:
        limits = [1 << 30]
        if self.settings.max_episode_tokens is not None:
            limits.append(self.settings.max_episode_tokens)
        if self.settings.context is not None:
            limits.append(self.settings.context - len(e.prompt_ids))
        return max(0, min(limits) - len(e.tokens))

    # -- the environment's tokens ------------------------------------------------------------

    def _reply_ids(self, replies: list[dict]) -> list[int]:
        """Token ids of the environment's reply messages, appended after the model's turn."""
        if not self.chat:
            template = self.settings.reply_template
            text = "".join(template.format(**{"name": "", **m}) for m in replies)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        before, after = self._bridge(replies)
        return self.tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]

    def _bridge(self, replies: list[dict]) -> tuple[str, str]:
        """(a dummy conversation up to the end token of its assistant turn, the same conversation
        with `replies` and the next generation prompt): the reply's text is the difference."""
        dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        schemas = self.parser.schemas.values() if self.parser is not None else []
        tools = list(schemas) or None  # as the prompt renders them
        render = self.tokenizer.apply_chat_template
        first = render(dummy, tools=tools, tokenize=False)
        end = self.tokenizer.eos_token or ""
        cut = first.rfind(end) + len(end) if end and end in first else len(first)
        after = render(dummy + replies, tools=tools, tokenize=False, add_generation_prompt=True)
        if after[:cut] != first[:cut]:
            raise ConfigError(
                "the chat template renders earlier turns differently when a reply follows; "
                "episodes need a template that appends (set model.tokenizer to one that does)"
            )
        return first[:cut], after

    # -- the result --------------------------------------------------------------------------

    def _collect(self, episodes: list[_Episode]) -> Sampled:
        pad = self.tokenizer.pad_token_id
        p_ids, p_mask = pad_prompts([e.prompt_ids for e in episodes], pad)
        c_ids, c_mask, logprobs = pad_completions(
            [e.tokens for e in episodes], pad, [e.logprobs for e in episodes]
        )
        T = c_ids.shape[1]

        def padded(values: list[list], fill, dtype) -> torch.Tensor:
            return torch.tensor([v + [fill] * (T - len(v)) for v in values], dtype=dtype)

        rollout = Rollout(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            completion_ids=c_ids,
            completion_mask=c_mask,
            truncated=torch.tensor([e.truncated for e in episodes]),
            logprobs=logprobs,
            action_mask=padded([e.actions for e in episodes], False, torch.bool),
            # a gym environment's per-turn rewards; None for tools (there are none)
            turn_rewards=padded([e.rewards for e in episodes], 0.0, torch.float32)
            if self.gym
            else None,
        )
        texts = [self.tokenizer.decode(e.tokens, skip_special_tokens=True) for e in episodes]
        envs = [e.env for e in episodes]
        return Sampled(
            rollout=rollout,
            completions=[e.messages for e in episodes],
            completion_ids=[e.tokens for e in episodes],
            texts=texts,
            reward_kwargs={REWARD_ARGUMENT: envs} if self.environment_factory else {},
        )


def _step_reward(e: _Episode, reward) -> float:
    """A gym `step`'s reward, checked as a reward function's are: a finite number within
    float32's range (bools as 1 / 0), else an EpisodeError naming the environment and episode."""
    value = as_float(reward)
    if value is None or not fits_float32(value):
        raise EpisodeError(
            f"environment {type(e.env).__name__}.step returned reward {reward!r} "
            f"({type(reward).__name__}) in episode {e.index} (row {short(e.row)}); expected a "
            "finite number within float32's range, or None"
        )
    return value
