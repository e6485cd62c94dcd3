"""Mamba's selective state-space mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces").

Idea: after a short causal depthwise convolution, every channel runs a linear recurrence
h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t, whose step dt and projections B, C
depend on the token (selective), gated by silu(z). A sequence's whole past lives in a fixed-size
state (the last ``conv_kernel - 1`` conv inputs and h, intermediate x state_size), so memory per
sequence does not grow with its length and one decode step costs the same at any context.
Prefill scans in float32 from the state the previous prefill chunk left (zero for a sequence's
first chunk). On accelerators it runs a chunked parallel scan: h_t = a_t h_{t-1} + b_t composes
affine maps, an associative operation, so within a chunk of ``SCAN_CHUNK`` tokens log2(``SCAN_CHUNK``)
doubling steps (Hillis & Steele 1986; Blelloch 1990) give every token the map from the chunk's
start as whole-tensor ops, and only the chunks' end states are carried one after another. Only
products of decays in (0, 1] are formed, never exp of a positive sum, so it cannot overflow
whatever the step sizes. On CPU ``sequential_scan``, the token-by-token reference, is faster (see
``scan_for``). Decode takes one recurrent step for all single-token sequences at once.
The engine gives every running sequence a slot of the state pool (``RecurrentStateSpec``) and
binds the pool's tensors here; switch it on by loading a ``MambaForCausalLM`` checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effinfer.layers.attention import DenseCausal
from effinfer.layers.cache_spec import SSM_STATE_DTYPE, RecurrentMetadata, RecurrentStateSpec
from effinfer.layers.linear import Linear

# Tokens whose discretised A and B x are materialised at once during a prefill: bounds the scratch
# memory (a few [window, intermediate, state_size] float32 tensors) for long prompts.
SCAN_WINDOW = 256
# Tokens one doubling scan combines: log2 of it whole-window steps, then window / chunk sequential
# carries of one [intermediate, state_size] state each.
SCAN_CHUNK = 16


def sequential_scan(decay: torch.Tensor, inputs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """h_t = decay_t * h_{t-1} + inputs_t token by token from h_0 = ``state``: every h_t [T, ...]
    (the reference for ``chunked_scan``)."""
    states = torch.empty_like(decay)
    for t in range(decay.shape[0]):
        state = torch.addcmul(inputs[t], decay[t], state, out=states[t])
    return states


def chunked_scan(
    decay: torch.Tensor, inputs: torch.Tensor, state: torch.Tensor, chunk: int = SCAN_CHUNK
) -> torch.Tensor:
    """``sequential_scan`` as whole-tensor ops: every h_t [T, ...] of h_t = decay_t * h_{t-1} + inputs_t.

    ``decay`` and ``inputs`` are overwritten (the result lives in ``inputs``' memory). Each token's
    pair (a, b) stands for the map h -> a h + b; after the doubling steps over a chunk, token j holds
    the composition of its chunk's maps 0..j, so h_j = a_j h_start + b_j once the chunk's starting
    state is known.
    """
    length = decay.shape[0]
    full = length - length % chunk
    for part, size in ((slice(0, full), chunk), (slice(full, length), length - full)):
        if part.stop > part.start:  # the whole chunks, then the rest as one shorter chunk
            shape = (-1, size, *decay.shape[1:])
            states = _compose_and_apply(decay[part].view(shape), inputs[part].view(shape), state)
            state = states[-1, -1]
    return inputs


def scan_for(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The prefill scan for ``device``: the chunked parallel scan where each op costs a kernel launch
    and bandwidth is plentiful (GPUs), the token loop on CPU. There one step's [intermediate,
    state_size] update stays in cache while the doubling steps stream the whole window ~10 times
    (a rough measurement on a loaded 2-core machine: the loop 2.5x faster per token with a 128 x 16
    state, 6.6x with 1536 x 16)."""
    return sequential_scan if device.type == "cpu" else chunked_scan


def _compose_and_apply(decay: torch.Tensor, inputs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """[chunks, L, ...] maps (in place) -> the states [chunks, L, ...], chunk 0 starting from ``state``."""
    length = decay.shape[1]
    step = 1
    while step < length:  # token j's map (tokens j - step + 1..j) after token j - step's (the step before)
        inputs[:, step:] = torch.addcmul(inputs[:, step:], decay[:, step:], inputs[:, :-step])
        decay[:, step:] = decay[:, step:] * decay[:, :-step]
        step *= 2
    starts = torch.empty_like(decay[:, 0])
    for c in range(decay.shape[0]):  # each chunk starts where the previous one ended
        starts[c] = state
        state = torch.addcmul(inputs[c, -1], decay[c, -1], state)
    return inputs.addcmul_(decay, starts[:, None])


class MambaMixer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        state_size: int,
        conv_kernel: int,
        time_step_rank: int,
        use_bias: bool = False,
        use_conv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.intermediate_size, self.state_size = intermediate_size, state_size
        self.conv_kernel, self.time_step_rank = conv_kernel, time_step_rank
        self.in_proj = Linear(hidden_size, 2 * intermediate_size, bias=use_bias)  # x, then the gate z
        self.conv1d = nn.Conv1d(
            intermediate_size, intermediate_size, conv_kernel, groups=intermediate_size, bias=use_conv_bias
        )
        self.x_proj = Linear(intermediate_size, time_step_rank + 2 * state_size)  # dt (low rank), B, C
        self.dt_proj = Linear(time_step_rank, intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(intermediate_size, state_size))
        self.D = nn.Parameter(torch.empty(intermediate_size))
        self.out_proj = Linear(intermediate_size, hidden_size, bias=use_bias)
        # The state pool, bound by the runner: [slots, intermediate, conv_kernel - 1] in the model dtype
        # and [slots, intermediate, state_size] in float32.
        self.conv_states: torch.Tensor | None = None
        self.ssm_states: torch.Tensor | None = None

    def state_spec(self) -> RecurrentStateSpec:
        return RecurrentStateSpec(
            (self.intermediate_size, self.conv_kernel - 1), (self.intermediate_size, self.state_size)
        )

    def bind_state(self, conv_states: torch.Tensor, ssm_states: torch.Tensor) -> None:
        """Attach this layer's share of the state pool: one conv and one SSM state per slot."""
        self.conv_states, self.ssm_states = conv_states, ssm_states

    def forward(self, x: torch.Tensor, meta: RecurrentMetadata | DenseCausal) -> torch.Tensor:
        """[T, hidden] -> [T, hidden] for a flat batch; reads and updates the states of ``meta``'s slots."""
        if isinstance(meta, DenseCausal):  # whole sequences from zero, states thrown away
            conv, ssm = self._zero_states(meta.batch, x)
            slots = torch.arange(meta.batch, device=x.device)
            meta = RecurrentMetadata([meta.seq_len] * meta.batch, slots, slots[:0])
        else:
            conv, ssm = self.conv_states, self.ssm_states
            if conv is None:
                raise RuntimeError("the Mamba layer has no state pool: the engine's runner binds one")
            if meta.fresh_slots.numel():
                conv.index_fill_(0, meta.fresh_slots, 0)
                ssm.index_fill_(0, meta.fresh_slots, 0)
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        y = torch.empty_like(u)
        decode = meta.decode_part
        if decode is not None:
            rows, slots = decode
            if rows.numel() == x.shape[0]:
                y = self._step(u, gate, conv, ssm, slots)
            else:
                y.index_copy_(0, rows, self._step(u[rows], gate[rows], conv, ssm, slots))
        for start, length, slot in meta.scanned_seqs:
            rows = slice(start, start + length)
            y[rows] = self._scan(u[rows], gate[rows], conv[slot], ssm[slot])
        return self.out_proj(y)

    def _zero_states(self, batch: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.state_spec()
        conv = torch.zeros(batch, *spec.conv_state_shape, dtype=x.dtype, device=x.device)
        return conv, torch.zeros(batch, *spec.ssm_state_shape, dtype=SSM_STATE_DTYPE, device=x.device)

    def _selective_inputs(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt, B, C) in float32 of conv outputs [T, intermediate]: the token-dependent SSM parameters."""
        dt, B, C = self.x_proj(xc).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        return F.softplus(self.dt_proj(dt).float()), B.float(), C.float()

    def _finish(self, scanned: torch.Tensor, xc: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """C h + D x, gated by silu(z), in the activation dtype."""
        return ((scanned + xc.float() * self.D.float()) * F.silu(gate.float())).to(gate.dtype)

    def _scan(
        self, u: torch.Tensor, gate: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's L new tokens [L, intermediate], continuing from (and updating) its states."""
        length = u.shape[0]
        window = torch.cat([conv_state, u.t()], dim=-1)  # [intermediate, K - 1 + L]
        if self.conv_kernel > 1:
            conv_state.copy_(window[:, -(self.conv_kernel - 1) :])
        bias = self.conv1d.bias
        xc = F.silu(F.conv1d(window[None], self.conv1d.weight, bias, groups=self.intermediate_size)[0].t())
        dt, B, C = self._selective_inputs(xc)
        A = -torch.exp(self.A_log.float())
        h = ssm_state.float()
        scanned = torch.empty(length, self.intermediate_size, dtype=torch.float32, device=u.device)
        for first in range(0, length, SCAN_WINDOW):
            part = slice(first, min(first + SCAN_WINDOW, length))
            decay = torch.exp(dt[part, :, None] * A)  # [w, intermediate, N]
            inputs = (dt[part] * xc[part].float())[:, :, None] * B[part, None, :]
            states = scan_for(u.device)(decay, inputs, h)
            h = states[-1]
            scanned[part] = (states @ C[part, :, None])[..., 0]
        ssm_state.copy_(h)
        return self._finish(scanned, xc, gate)

    def _step(
        self, u: torch.Tensor, gate: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """One new token for each of B sequences [B, intermediate]: the recurrent update of their slots."""
        window = torch.cat([conv.index_select(0, slots), u[:, :, None]], dim=-1)  # [B, intermediate, K]
        conv.index_copy_(0, slots, window[:, :, 1:])
        xc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc)
        dt, B, C = self._selective_inputs(xc)
        decay = torch.exp(dt[:, :, None] * -torch.exp(self.A_log.float()))
        h = decay * ssm.index_select(0, slots) + (dt * xc.float())[:, :, None] * B[:, None, :]
        ssm.index_copy_(0, slots, h)
        return self._finish((h @ C[:, :, None])[..., 0], xc, gate)
