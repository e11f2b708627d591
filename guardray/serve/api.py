"""The HTTP contract: OpenAI-compatible chat completions with a `guard` field, probe scoring, and the server's
settings. Pydantic models, so a malformed request is refused with the field it got wrong."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from guardray.errors import InputError
from guardray.serve.engine import GUARD_MODES, POLICIES, ChatRequest, Completion, Sampling, Verdict
from guardray.jobspec import DeviceName

Policy = Literal["block", "flag"]
GuardMode = Literal["none", "probe", "model", "both"]
assert set(POLICIES) == set(Policy.__args__) and set(GUARD_MODES) == set(GuardMode.__args__)  # type: ignore[attr-defined]


class ServeSettings(BaseModel):
    """What `guardray serve` runs (also the `args` of a Serve config file: `cluster/serve.yaml`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact: str = Field(description="Job output, probes stage or probe artifact directory (local or gs://).")
    probe: str | None = Field(None, description="Probe name in a job's probes stage (default: its headline probe).")
    threshold: float | None = Field(None, allow_inf_nan=False,
                                    description="Decision threshold on the probe score (default: the artifact's).")
    policy: Policy = Field("flag", description="Over the threshold: 'block' refuses without generating, 'flag' "
                           "answers and marks the response. A request may ask for either.")
    guard: GuardMode = Field("probe", description="'probe', 'both' (and the guard model, shadow mode), 'model' (the "
                             "guard model alone, before generation), 'none'.")
    allow_request_overrides: StrictBool = Field(
        False, description="Let requests choose any `policy` and `guard` (a benchmark, a trusted caller). Without "
        "it a request may only make its own check stricter: policy 'block', guard 'both'.")
    # safety switches: YAML booleans only, and never taken from the artifact
    allow_pickle: StrictBool = Field(
        False, description="Load a pickled probe (a non-linear type): unpickling runs code, so only for artifacts "
        "from a source you trust. Without it such an artifact is refused.")
    trust_remote_code: StrictBool = Field(
        False, description="Let the chat and guard models run their own Python code (transformers' "
        "trust_remote_code). The artifact's record of it is ignored.")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of the environment variable holding the "
        "bearer token every request must send (`Authorization: Bearer <key>`); it must be set where the replicas "
        "run. Only the name is stored, never the key.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; a larger one gets 413 "
                                "before it is read.")
    refusal: str = "I can't help with that request."
    device: DeviceName | None = Field(None, description="Override the artifact's model device (auto, cpu, cuda, cuda:N).")
    max_tokens: int = Field(256, ge=1, description="Default and upper bound of a request's max_tokens.")
    max_batch_size: int = Field(8, ge=1, description="Concurrent requests batched into one generate call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, ge=1, description="Per replica: requests being answered.")
    max_queued_requests: int = Field(128, ge=1, description="Per replica: more requests that wait for the model. "
                                     "Beyond both, a request gets 503 with Retry-After at once (bounded queueing).")
    retry_after_s: int = Field(1, ge=1, description="The Retry-After of a 503 (seconds).")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="Per replica: 1 on a GPU cluster (the model's device 'auto' "
                            "then picks cuda).")


def _unicode(text: str) -> str:
    """JSON may escape a lone surrogate (`"\\ud800"`), which no tokenizer takes: refused here, as a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields guardray honours; unknown ones are ignored, as OpenAI-compatible servers do. `policy`
    and `guard` are guardray's own."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # torch.manual_seed's range
    stream: bool = False
    policy: Policy | None = None
    guard: GuardMode | None = None

    def to_request(self, settings: ServeSettings) -> ChatRequest:
        asked = self.max_completion_tokens or self.max_tokens or settings.max_tokens
        if asked > settings.max_tokens:
            raise InputError(f"max_tokens: {asked} is over this server's limit of {settings.max_tokens}")
        policy, guard = self.policy or settings.policy, self.guard or settings.guard
        if not settings.allow_request_overrides:
            if policy != settings.policy and policy != "block":
                raise InputError(f"policy: this server runs policy {settings.policy!r}; a request may only ask "
                                 "for 'block'")
            if guard != settings.guard and not (settings.guard == "probe" and guard == "both"):
                raise InputError(f"guard: this server runs guard {settings.guard!r}; a request may only add the "
                                 "guard model to the probe ('both')")
        return ChatRequest(tuple((m.role, m.content) for m in self.messages),
                           Sampling(asked, self.temperature, self.top_p, self.seed), policy, guard)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[Text] = Field(min_length=1, max_length=256)


def completion_body(completion: Completion, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason}],
        "usage": usage(completion),
        "guard": completion.verdict.to_dict(),
    }


def usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def chunk(stream_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """One server-sent event of a streamed completion (OpenAI's chat.completion.chunk)."""
    return {"id": stream_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}


def score_body(verdicts: list[Verdict]) -> dict[str, Any]:
    return {"object": "list", "data": [{"index": i, **v.to_dict()} for i, v in enumerate(verdicts)]}


def sse(event: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(event)}\n\n"
