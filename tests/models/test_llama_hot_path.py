"""`LlamaForCausalLM.loss`, the training hot path, against transformers and against our plain path.

The hot path runs right-padded batches without an attention mask, GQA without repeating k/v,
`lm_head` on the target rows only (chunked), packed batches as block-diagonal causal attention,
and lean RMSNorm / SwiGLU / RoPE. Each is checked equal to a plain computation: transformers
with its mask and its full-logits loss (fp32, 1e-5), and our own plain path (explicit boolean
mask, HF-math ops, full logits) in float64 to 1e-11.
"""

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from pefomed.models import llama
from pefomed.models.llama import REFERENCE_OPS, KVCache, LlamaForCausalLM, Packing, TargetRows
from pefomed.models.vlm import target_token_loss

VOCAB = 300
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
CASES = {
    "llama3-gqa": (transformers.LlamaForCausalLM, dict(BASE, num_key_value_heads=2, rope_theta=500000.0,
                                                       rope_scaling=LLAMA3_ROPE)),
    "tied-mha": (transformers.LlamaForCausalLM, dict(BASE, tie_word_embeddings=True)),
    "mistral-window": (transformers.MistralForCausalLM, dict(BASE, num_key_value_heads=2, sliding_window=5)),
}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def save_hf(tmp_path, name):
    cls, kwargs = copy.deepcopy(CASES[name])
    config_cls = transformers.MistralConfig if cls is transformers.MistralForCausalLM else transformers.LlamaConfig
    torch.manual_seed(0)
    model = cls(config_cls(**kwargs, attn_implementation="eager"))
    model.save_pretrained(tmp_path)
    return model


def right_padded(lengths=(14, 9, 12), answer=4, seed=1):
    """Right-padded ids, mask and labels; each row's last `answer` real tokens are targets."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        labels[r, n - answer : n] = ids[r, n - answer : n]
        ids[r, n:] = 0
    return ids, mask, labels


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_match_transformers(tmp_path, name):
    """fp32: our maskless, target-rows-only loss against HF's masked, full-logits loss."""
    hf = save_hf(tmp_path, name).train()
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()
    ids, mask, labels = right_padded()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    loss, n = ours.loss(labels, input_ids=ids)
    loss.backward()
    assert n.dtype == torch.long and int(n) == int((labels[:, 1:] != -100).sum())
    assert rel(loss, ref) < 1e-6
    want, got = param_grads(hf), param_grads(ours)
    assert got.keys() == want.keys() and len(got) == len(list(ours.parameters()))
    for key in want:
        assert rel(got[key], want[key]) < 1e-5, key
    if name == "tied-mha":  # one tensor, two uses: the embedding rows and the head both contribute
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def plain_loss(model, ids, mask, labels, monkeypatch):
    """Our model the plain way: an explicit boolean mask, full logits, autograd's cross-entropy."""
    with monkeypatch.context() as m:
        m.setattr(llama, "_padding_matters", lambda *a: True)  # forces the dense mask through SDPA
        logits = model(ids, attention_mask=mask)
    return target_token_loss(logits, labels)


@pytest.mark.parametrize("name", list(CASES))
def test_hot_path_equals_plain_path_in_float64(tmp_path, monkeypatch, name):
    save_hf(tmp_path, name)
    plain = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, ops=REFERENCE_OPS).train()
    lean = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).train()
    ids, mask, labels = right_padded()
    ref, ref_n = plain_loss(plain, ids, mask, labels, monkeypatch)
    ref.backward()
    monkeypatch.setattr(llama, "LOSS_CHUNK_ELEMENTS", 2 * VOCAB)  # 2 rows a chunk: several chunks
    loss, n = lean.loss(labels, input_ids=ids)
    loss.backward()
    assert int(n) == int(ref_n) and rel(loss, ref) < 1e-12
    want, got = param_grads(plain), param_grads(lean)
    assert got.keys() == want.keys()
    for key in want:
        assert rel(got[key], want[key]) < 1e-11, key


def test_target_rows_loss_and_head_gradient_against_full_logits_in_float64():
    """The chunked head + cross-entropy alone, with a head that trains, on odd row counts."""
    torch.manual_seed(3)
    hidden = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    head = llama.LMHead(24, 53).double()
    targets = torch.randint(0, 53, (37,))
    ref = F.cross_entropy(F.linear(hidden, head.weight), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.7, [hidden, head.weight])
    for chunk_elements in (53, 5 * 53, 1 << 24):  # 1 row, 5 rows (a ragged last chunk), all rows
        llama.LOSS_CHUNK_ELEMENTS, saved = chunk_elements, llama.LOSS_CHUNK_ELEMENTS
        try:
            total = head(hidden, targets=targets)
        finally:
            llama.LOSS_CHUNK_ELEMENTS = saved
        got = torch.autograd.grad(total * 0.7, [hidden, head.weight])
        assert rel(total, ref) < 1e-13
        assert rel(got[0], ref_grads[0]) < 1e-12 and rel(got[1], ref_grads[1]) < 1e-12
    assert torch.equal(head(hidden[:2]), F.linear(hidden[:2], head.weight))  # rows alone: logits


def test_no_targets_gives_zero_loss_and_zero_gradients(tmp_path):
    save_hf(tmp_path, "llama3-gqa")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids, _, labels = right_padded()
    loss, n = model.loss(torch.full_like(labels, -100), input_ids=ids)
    loss.backward()
    assert int(n) == 0 and float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_gqa_never_repeats_keys_and_values(tmp_path, monkeypatch):
    save_hf(tmp_path, "llama3-gqa")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids, mask, labels = right_padded()

    def refuse(*args, **kwargs):
        raise AssertionError("repeat_interleave on the hot path")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    loss, _ = model.loss(labels, input_ids=ids)
    loss.backward()
    left = torch.flip(mask, [1])  # left padding: the dense-mask path of generation
    model.generate(torch.flip(ids, [1]), attention_mask=left, max_new_tokens=3)


def packed_from_padded(ids, mask, labels, rows):
    """The padded batch's samples packed as `rows` (lists of sample indices), each row padded with
    a tail segment of its own to the widest row."""
    lengths = mask.sum(1).tolist()
    width = max(sum(lengths[i] for i in row) for row in rows)
    p_ids = torch.zeros(len(rows), width, dtype=torch.long)
    p_labels = torch.full((len(rows), width), -100)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            p_ids[r, start : start + n] = ids[i, :n]
            p_labels[r, start : start + n] = labels[i, :n]
            positions[r, start : start + n] = torch.arange(n)
            segments.append(n)
            start += n
        if start < width:
            positions[r, start:] = torch.arange(width - start)
            segments.append(width - start)
    return p_ids, p_labels, positions, Packing.from_lengths(segments)


@pytest.mark.parametrize("name", ["llama3-gqa", "mistral-window"])
def test_packed_loss_equals_padded_loss_in_float64(tmp_path, name):
    save_hf(tmp_path, name)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).train()
    ids, mask, labels = right_padded(lengths=(11, 7, 9))
    ref, ref_n = model.loss(labels, input_ids=ids)
    ref.backward()
    want = param_grads(model)
    model.zero_grad(set_to_none=True)
    p_ids, p_labels, positions, packing = packed_from_padded(ids, mask, labels, [[0, 1], [2]])
    assert packing.lengths == (11, 7, 9, 9)  # the second row's padding tail is a segment too
    loss, n = model.loss(p_labels, input_ids=p_ids, position_ids=positions, packing=packing)
    loss.backward()
    assert int(n) == int(ref_n) and rel(loss, ref) < 1e-12
    got = param_grads(model)
    for key in want:
        assert rel(got[key], want[key]) < 1e-11, key
    # The collate's precomputed rows give the same loss; without position ids the packing's are used.
    targets = TargetRows.from_labels(p_labels, positions)
    again, _ = model.loss(input_ids=p_ids, packing=packing, targets=targets)
    assert rel(again, ref) < 1e-12


def test_a_target_never_crosses_a_segment_boundary():
    labels = torch.tensor([[-100, 5, 6, 7, 8, -100]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])  # a second sample starts at column 3
    assert TargetRows.from_labels(labels).index.tolist() == [0, 1, 2, 3]
    targets = TargetRows.from_labels(labels, positions)
    assert targets.index.tolist() == [0, 1, 3] and targets.ids.tolist() == [5, 6, 8]


# ---------------------------------------------------------------- optional backends, faked


def reference_attention(q, k, v, causal, window=None):
    """[B, T, H, D] attention in float64 (GQA by repeating), causal from the bottom right."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    tq, tk = q.shape[2], k.shape[2]
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(diagonal=tk - tq)
    if window is not None:
        allowed = allowed & torch.ones(tq, tk, dtype=torch.bool).triu(diagonal=tk - tq - window + 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)


def fake_flash_attn(calls):
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        calls.append(("dense", tuple(q.shape), tuple(k.shape), causal, window_size))
        window = None if window_size[0] < 0 else window_size[0] + 1
        return reference_attention(q, k, v, causal, window).to(q.dtype)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window_size=(-1, -1)):
        calls.append(("varlen", tuple(q.shape), tuple(k.shape), cu_q.tolist(), max_q, causal, window_size))
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        window = None if window_size[0] < 0 else window_size[0] + 1
        bounds = cu_q.tolist()
        outs = [reference_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal, window)[0]
                for a, b in zip(bounds[:-1], bounds[1:])]  # fmt: skip
        return torch.cat(outs).to(q.dtype)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def fake_xformers(calls):
    ops = types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    class BlockDiagonalCausalMask:
        def __init__(self, lengths, window=None):
            self.lengths, self.window = lengths, window

        @classmethod
        def from_seqlens(cls, q_seqlen):
            return cls(list(q_seqlen))

        def make_local_attention(self, window_size):
            return BlockDiagonalCausalMask(self.lengths, window_size)

    def memory_efficient_attention(q, k, v, attn_bias=None):
        # [B, M, G, H/G, D], k and v broadcast over the group's heads (stride 0): never copied.
        assert q.dim() == 5 and k.stride(3) == 0 and v.stride(3) == 0
        calls.append((tuple(q.shape), type(attn_bias).__name__))
        b, m, g, hg, d = q.shape
        q4, k4, v4 = q.reshape(b, m, g * hg, d), k[:, :, :, 0], v[:, :, :, 0]
        if isinstance(attn_bias, BlockDiagonalCausalMask):
            out, start = [], 0
            for n in attn_bias.lengths:
                out.append(reference_attention(q4[:, start : start + n], k4[:, start : start + n],
                                               v4[:, start : start + n], True, attn_bias.window))  # fmt: skip
                start += n
            out = torch.cat(out, 1)
        else:
            out = reference_attention(q4, k4, v4, isinstance(attn_bias, LowerTriangularMask))
        return out.reshape(b, m, g, hg, d).to(q.dtype)

    ops.LowerTriangularMask = LowerTriangularMask
    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalCausalMask=BlockDiagonalCausalMask))
    root = types.ModuleType("xformers")
    root.ops = ops
    return root, ops


@pytest.mark.parametrize("backend", ["flash_attention_2", "xformers"])
@pytest.mark.parametrize("name", ["llama3-gqa", "mistral-window"])
def test_backends_get_packed_and_causal_batches_in_their_layout(tmp_path, monkeypatch, backend, name):
    calls = []
    if backend == "flash_attention_2":
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    else:
        root, ops = fake_xformers(calls)
        monkeypatch.setitem(sys.modules, "xformers", root)
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    save_hf(tmp_path, name)
    sdpa = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    other = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation=backend)
    ids, mask, labels = right_padded(lengths=(11, 7, 9))
    assert rel(other.loss(labels, input_ids=ids)[0], sdpa.loss(labels, input_ids=ids)[0]) < 1e-12
    p_ids, p_labels, positions, packing = packed_from_padded(ids, mask, labels, [[0, 1], [2]])
    args = dict(input_ids=p_ids, position_ids=positions, packing=packing)
    assert rel(other.loss(p_labels, **args)[0], sdpa.loss(p_labels, **args)[0]) < 1e-12
    window = CASES[name][1].get("sliding_window")
    if backend == "flash_attention_2":
        flash_window = (-1, -1) if window is None else (window - 1, 0)
        # k keeps its 2 kv heads (GQA is the kernel's), segments are int32 offsets over the rows.
        assert ("dense", (3, 11, 4, 16), (3, 11, 2, 16), True, flash_window) in calls
        assert ("varlen", (36, 4, 16), (36, 2, 16), [0, 11, 18, 27, 36], 11, True, flash_window) in calls
    else:
        kinds = {kind for _, kind in calls}
        assert "BlockDiagonalCausalMask" in kinds
        assert ((1, 36, 2, 2, 16), "BlockDiagonalCausalMask") in calls
        if window is None:  # a binding window on a padded batch goes through SDPA's dense mask
            assert ((3, 11, 2, 2, 16), "LowerTriangularMask") in calls


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attention_2", "xformers"])
def test_real_backends_packed_equals_padded_on_cuda(tmp_path, backend):
    pytest.importorskip("flash_attn" if backend == "flash_attention_2" else "xformers.ops")
    save_hf(tmp_path, "llama3-gqa")
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", attn_implementation=backend)
    ids, mask, labels = right_padded(lengths=(64, 37, 50))
    p_ids, p_labels, positions, packing = packed_from_padded(ids, mask, labels, [[0, 1], [2]])
    packing = Packing.from_lengths(packing.lengths, "cuda")
    want, _ = ref.loss(labels.cuda(), input_ids=ids.cuda())
    padded, _ = model.loss(labels.cuda(), input_ids=ids.cuda())
    packed, _ = model.loss(p_labels.cuda(), input_ids=p_ids.cuda(), position_ids=positions.cuda(), packing=packing)
    assert rel(padded, want) < 2e-2 and rel(packed, want) < 2e-2


# ---------------------------------------------------------------- decoding


def test_decoding_builds_its_mask_and_rope_table_once(tmp_path, monkeypatch):
    save_hf(tmp_path, "llama3-gqa")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask, _ = right_padded()
    left, left_ids = torch.flip(mask, [1]), torch.flip(ids, [1])  # left padding: a mask is needed
    built = {"mask": 0, "table": 0}
    dense, tables = llama._dense_mask, llama.RotaryEmbedding.tables

    def count_mask(*args, **kwargs):
        built["mask"] += 1
        return dense(*args, **kwargs)

    def count_table(self, length, device):
        before = dict(self._tables)
        out = tables(self, length, device)
        built["table"] += before.get(device) is not out and before.get(device, (None,))[0] is not out[0]
        return out

    monkeypatch.setattr(llama, "_dense_mask", count_mask)
    monkeypatch.setattr(llama.RotaryEmbedding, "tables", count_table)
    model.model.rotary_emb._tables = {}
    out = model.generate(left_ids, attention_mask=left, max_new_tokens=12, eos_token_id=None)
    assert out.shape == (3, 12)
    assert built == {"mask": 1, "table": 1}  # the prompt's; the 11 decoding steps look both up
    cache = KVCache.allocate(model.config, 1, 4, "cpu", torch.float32)
    cache.set_valid(torch.ones(1, 2, dtype=torch.long))
    assert not cache.padded and cache.plan(2, None).dense is None  # no padding: causal, no mask at all
