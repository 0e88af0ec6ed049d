"""The GPU kernel paths (FlexAttention document mask, grouped_mm experts, no host syncs, per-block compile),
checked on the CPU against today's paths; the `cuda` tests run them on a GPU when there is one."""

import contextlib
import warnings

import pytest
import torch

from pangu_model import PanguModel, get_config
from pangu_model.masks import (
    attention_backend,
    attention_layout,
    document_block_mask,
    document_causal_mask,
    document_ids_from_positions,
    document_mask_mod,
    position_ids_from_eot,
)
from pangu_model.moe import (
    ExpertBank,
    LearnedTopKExperts,
    MixtureOfGroupedExperts,
    expert_backend,
    expert_counts,
    grouped_experts,
    select_expert_backend,
)
from pangu_model.speed import autocast, configure_cuda_matmul, maybe_compile

flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")

EOT = 9
VOCAB = 64
CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    # Eager FlexAttention (the CPU) warns that it is unfused; that is expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def small(router: str = "dense", **overrides):
    base = dict(vocab_size=VOCAB, max_seq_len=32, d_model=32, num_heads=4, d_ff=64, num_layers=3, dropout=0.0)
    if router != "dense":
        base.update(router=router, moe_layers=2)
    base.update(overrides)
    return get_config("tiny", **base)


def packed_ids(batch: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (batch, length), generator=generator)
    ids[0, [4, 11]] = EOT  # three documents
    ids[1, length - 1] = EOT  # one document, closed at the end
    return ids  # row 2: one document


@contextlib.contextmanager
def forbid_host_sync():
    """Fail on the Python-level ways a forward pulls a device value to the host."""
    patch = pytest.MonkeyPatch()

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"device→host sync: Tensor.{name}")

        return raise_

    try:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        patch.undo()


# --- attention: backend choice ---------------------------------------------------------------------
def test_attention_backend_selection() -> None:
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_backend(gpu, training=True, dropout=0.1) == "flex"  # the hot loop
    assert attention_backend(gpu, training=False, dropout=0.1) == "sdpa"  # evaluation as before
    assert attention_backend(gpu, training=True, dropout=0.1, cached=True) == "sdpa"  # KV-cache decoding
    assert attention_backend(cpu, training=True, dropout=0.1) == "sdpa"  # the CPU never changes
    assert attention_backend(cpu, training=False) == "sdpa"
    assert attention_backend(gpu, training=True, dropout=0.1, requested="sdpa") == "sdpa"  # exact attention dropout
    assert attention_backend(cpu, training=False, requested="flex") == "flex"
    assert attention_backend(cpu, training=False, requested="flex", cached=True) == "sdpa"
    with pytest.raises(ValueError):
        attention_backend(cpu, training=False, requested="varlen")
    with pytest.raises(ValueError):
        PanguModel(small()).set_attention_backend("dense")


# --- attention: the block mask -------------------------------------------------------------------
def test_document_block_mask_equals_create_block_mask_and_the_dense_mask() -> None:
    """The block tables built from document ids are exactly what FlexAttention derives from the dense mask."""
    generator = torch.Generator().manual_seed(0)
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    for _ in range(60):
        batch = int(torch.randint(1, 4, (), generator=generator))
        total = int(torch.randint(1, 48, (), generator=generator))
        ids = torch.randint(0, 5, (batch, total), generator=generator)
        positions = position_ids_from_eot(ids, 0, start=torch.randint(0, 3, (batch,), generator=generator))
        documents = document_ids_from_positions(positions)
        query_length = int(torch.randint(1, total + 1, (), generator=generator))
        block = (1, 2, 4, 8, 16)[int(torch.randint(0, 5, (), generator=generator))]
        mine = document_block_mask(documents, query_length, block)
        reference = flex_attention_module.create_block_mask(
            document_mask_mod(documents, query_length), batch, 1, query_length, total, device="cpu", BLOCK_SIZE=block
        )
        for name in fields:
            assert torch.equal(getattr(mine, name), getattr(reference, name)), name
        dense = document_causal_mask(documents, query_length)
        assert torch.equal(mine.to_dense(), reference.to_dense())
        q, k, v = torch.randn(batch, 2, query_length, 8), torch.randn(batch, 2, total, 8), torch.randn(batch, 2, total, 8)
        torch.testing.assert_close(
            flex_attention_module.flex_attention(q, k, v, block_mask=mine),
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        )


def test_flex_layout_needs_no_host_sync_and_no_dense_mask() -> None:
    positions = position_ids_from_eot(packed_ids(), EOT)
    with forbid_host_sync():
        layout = attention_layout(positions, positions.shape[1], "flex")
    assert layout.mask is None and not layout.is_causal and layout.block_mask is not None


def test_sdpa_layout_is_unchanged() -> None:
    single = attention_layout(torch.arange(6)[None], 6)
    assert single.is_causal and single.mask is None and single.block_mask is None


# --- attention: the whole model -------------------------------------------------------------------
def test_flex_model_equals_sdpa_model_on_packed_and_unpacked_rows() -> None:
    torch.manual_seed(0)
    model = PanguModel(small()).eval()
    ids = packed_ids()
    with torch.no_grad():
        reference = model(ids).logits
        model.set_attention_backend("flex")
        flex = model(ids).logits
    torch.testing.assert_close(flex, reference)


def test_flex_packed_row_equals_documents_run_separately() -> None:
    torch.manual_seed(0)
    model = PanguModel(small()).eval().set_attention_backend("flex")
    docs = [torch.tensor([20, 21, 22, EOT]), torch.tensor([30, 31, EOT]), torch.tensor([40, 41, 42, 43, 44])]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None]).logits[0]
        model.set_attention_backend("auto")
        separate = torch.cat([model(doc[None]).logits[0] for doc in docs])
    torch.testing.assert_close(packed, separate)


# --- routed experts: grouped_mm path ------------------------------------------------------------
def test_expert_backend_selection() -> None:
    assert select_expert_backend("cuda", torch.bfloat16, 9) == "grouped"
    assert select_expert_backend("cuda", torch.bfloat16, 8) == "grouped"
    assert select_expert_backend("cuda", torch.bfloat16, 7) == "loop"  # grouped_mm needs SM ≥ 80
    assert select_expert_backend("cuda", torch.float32, 9) == "loop"
    assert select_expert_backend("cpu", torch.bfloat16, None) == "loop"
    assert select_expert_backend("cpu", torch.float32, None, requested="grouped") == "grouped"
    assert expert_backend(torch.zeros(2, 2)) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert expert_backend(torch.zeros(2, 2)) == "loop"  # a bf16 CPU autocast keeps the CPU path
    with pytest.raises(ValueError):
        select_expert_backend("cpu", torch.float32, None, requested="dense")


def test_expert_counts_equal_bincount() -> None:
    index = torch.randint(0, 7, (50,))
    assert torch.equal(expert_counts(index, 9), torch.bincount(index, minlength=9))


def bank(num_experts: int = 6, d_model: int = 8, d_ff: int = 16) -> ExpertBank:
    torch.manual_seed(0)
    layer = ExpertBank(num_experts, d_model, d_ff)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    return layer


def test_grouped_experts_equal_the_loop_with_gradients() -> None:
    layer = bank()
    x = torch.randn(20, 8, requires_grad=True)
    token_index = torch.arange(18).repeat(2)  # tokens 18, 19 unassigned
    expert_index = torch.tensor([0, 1, 3, 4] * 9)[torch.randperm(36)]  # experts 2 and 5 empty
    weight = torch.rand(36, requires_grad=True)
    results = {}
    for backend in ("loop", "grouped"):
        layer.expert_backend = backend
        out = layer(x, expert_index, token_index, weight)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).square().sum(), [x, weight, *layer.parameters()])
        results[backend] = (out, grads)
    torch.testing.assert_close(results["grouped"][0], results["loop"][0])
    for a, b in zip(results["grouped"][1], results["loop"][1]):
        torch.testing.assert_close(a, b)
    assert results["grouped"][0][18:].abs().max() == 0


def test_grouped_experts_drop_the_sentinel_expert_exactly() -> None:
    """Assignments to expert E compute nothing and receive no gradient (they land in uninitialised rows)."""
    layer = bank(num_experts=4)
    x = torch.randn(12, 8, requires_grad=True)
    expert_index = torch.tensor([0, 4, 1, 4, 2, 3, 0, 4, 1, 2, 3, 4])
    keep = expert_index < 4
    token_index = torch.arange(12)
    args = (layer.num_experts, layer.w_in, layer.b_in, layer.w_out, layer.b_out)
    grouped = grouped_experts(x, expert_index, token_index, None, *args, backend="grouped")
    loop = grouped_experts(x, expert_index[keep], token_index[keep], None, *args, backend="loop")
    torch.testing.assert_close(grouped, loop)
    (grad_grouped,) = torch.autograd.grad(grouped.sum(), [x])
    (grad_loop,) = torch.autograd.grad(loop.sum(), [x])
    torch.testing.assert_close(grad_grouped, grad_loop)
    assert torch.isfinite(grad_grouped).all() and grad_grouped[~keep].abs().max() == 0


def test_a_shard_with_no_experts_to_run_returns_zeros_on_both_backends() -> None:
    """An expert-parallel ECSS rank that nothing was routed to computes with 0 fetched experts (the grouped
    path indexed the last of 0 group offsets: IndexError)."""
    layer = bank(num_experts=3)
    x = torch.randn(5, 8)
    empty = torch.zeros(0, dtype=torch.long)
    weights = [p[:0] for p in (layer.w_in, layer.b_in, layer.w_out, layer.b_out)]
    for backend in ("loop", "grouped"):
        out = grouped_experts(x, empty, empty, None, 0, *weights, backend=backend)
        assert out.shape == x.shape and out.abs().max() == 0, backend


def test_grouped_experts_need_no_host_sync() -> None:
    layer = bank()
    layer.expert_backend = "grouped"
    inputs = torch.randn(10, 8), torch.randint(0, 6, (10,)), torch.arange(10), torch.rand(10)
    with forbid_host_sync():
        out = layer(*inputs)
    assert out.shape == (10, 8)


def routed_layers_agree(layer: torch.nn.Module, x: torch.Tensor) -> None:
    results = {}
    for backend in ("loop", "grouped"):
        layer.experts.expert_backend = backend
        out, aux = layer(x)
        grads = torch.autograd.grad(out.square().sum() + aux, [p for p in layer.parameters()], allow_unused=True)
        results[backend] = (out, aux, grads, layer.last_stats)
    (out_g, aux_g, grads_g, stats_g), (out_l, aux_l, grads_l, stats_l) = results["grouped"], results["loop"]
    torch.testing.assert_close(out_g, out_l)
    torch.testing.assert_close(aux_g, aux_l)
    for a, b in zip(grads_g, grads_l):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:  # summation order differs between one grouped matmul and per-expert matmuls
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(stats_g.expert_load, stats_l.expert_load) and stats_g.dropped == stats_l.dropped


def test_topk_grouped_equals_loop_with_dropped_tokens() -> None:
    torch.manual_seed(0)
    layer = LearnedTopKExperts(small("topk", num_experts=4, topk_k=2, capacity_factor=0.5), layer_index=2)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 12, 32)
    routed_layers_agree(layer, x)
    assert layer.last_stats.dropped > 0  # the capacity did drop assignments


def test_dropped_rows_left_uninitialised_by_grouped_mm_never_reach_a_gradient(monkeypatch) -> None:
    """grouped_mm leaves the rows past the last group uninitialised; a dropped assignment's row is one of
    them. Filled with NaN here (what stale memory can hold), the output and every gradient stay finite."""
    import torch.nn.functional as F

    real = F.grouped_mm

    def poisoned(a, b, offs):
        out = real(a, b, offs=offs)
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(F, "grouped_mm", poisoned)
    torch.manual_seed(0)
    layer = LearnedTopKExperts(small("topk", num_experts=4, topk_k=2, capacity_factor=0.5), layer_index=2)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    layer.experts.expert_backend = "grouped"
    x = torch.randn(2, 12, 32, requires_grad=True)
    out, aux = layer(x)
    assert layer.last_stats.dropped > 0
    grads = torch.autograd.grad(out.square().sum() + aux, [x, *layer.parameters()], allow_unused=True)
    assert torch.isfinite(out).all()
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_moge_grouped_equals_loop() -> None:
    torch.manual_seed(0)
    layer = MixtureOfGroupedExperts(small("moge", num_experts=8, moge_groups=4, moge_shared_experts=1), 2)
    for name, p in layer.named_parameters():
        if name != "expert_scale":
            torch.nn.init.normal_(p, 0, 0.3)
    routed_layers_agree(layer, torch.randn(2, 10, 32))


def test_rre_model_grouped_equals_loop_in_training() -> None:
    torch.manual_seed(0)
    model = PanguModel(small("rre", num_domains=4, experts_per_domain=3))
    ids = packed_ids()
    domains = torch.tensor([0, 2, 3])
    results = {}
    for backend in ("loop", "grouped"):
        model.set_expert_backend(backend)
        out = model(ids[:, :-1], domain_ids=domains, labels=ids[:, 1:])
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        results[backend] = (out.logits, grads)
    torch.testing.assert_close(results["grouped"][0], results["loop"][0])
    for a, b in zip(results["grouped"][1], results["loop"][1]):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)
        else:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)


def test_training_forward_on_the_gpu_paths_needs_no_host_sync() -> None:
    """The CUDA training configuration (flex attention, grouped experts) runs its whole forward without
    pulling a value to the host (the CPU flex kernel has no backward). The domain-id check is the one
    exception on the CPU: it raises a ValueError there and uses a device-side assert on CUDA."""
    torch.manual_seed(0)
    ids = packed_ids()
    domains = torch.tensor([0, 1, 2])
    for config in (small("rre", num_domains=4, experts_per_domain=3, dropout=0.1),
                   small("topk", num_experts=4, topk_k=2, capacity_factor=0.5, dropout=0.1),
                   small("moge", num_experts=4, moge_groups=2, dropout=0.1)):
        model = PanguModel(config).train().set_attention_backend("flex").set_expert_backend("grouped")
        checked = model._domain_ids(domains, ids[:, :-1])  # the CPU's check, outside the ban
        model._domain_ids = lambda *_: checked
        with torch.no_grad(), forbid_host_sync():
            out = model(ids[:, :-1], domain_ids=domains, labels=ids[:, 1:])
        assert out.loss.shape == ()


def test_domain_check_on_the_device_raises() -> None:
    torch._assert_async(torch.tensor(True), "fine")  # the call the CUDA path makes instead of bool(...)
    with pytest.raises(RuntimeError):
        torch._assert_async(~torch.tensor(True), "domain ids must lie in range")
    model = PanguModel(small("rre", num_domains=4, experts_per_domain=3))
    with pytest.raises(ValueError):  # the CPU keeps its ValueError
        model(packed_ids(), domain_ids=torch.tensor([0, 1, 7]))


# --- speed switches -------------------------------------------------------------------------------
def test_configure_cuda_matmul_and_autocast() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_cuda_matmul()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        # Both spellings agree: readers of the older one (inductor's autotuning) raised on a mix of the two
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        configure_cuda_matmul(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    with autocast("cpu", "bf16"):
        assert not torch.is_autocast_enabled("cpu")  # the CPU is never autocast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": only the object's type matters here
        assert isinstance(autocast("cuda", "bf16"), torch.autocast)
    assert not isinstance(autocast("cuda", "fp32"), torch.autocast)


def test_per_block_compile_keeps_names_and_outputs() -> None:
    """Dynamo traces every block as one graph (aot_eager: no C++ build); names and outputs do not change."""
    torch.manual_seed(0)
    model = PanguModel(small(dropout=0.0))
    ids = packed_ids()
    reference = model(ids[:, :-1], labels=ids[:, 1:])
    reference_grads = torch.autograd.grad(reference.loss, list(model.parameters()))
    names = list(model.state_dict())
    assert maybe_compile(model, False) is model
    maybe_compile(model, True, backend="aot_eager", fullgraph=True)
    assert list(model.state_dict()) == names
    out = model(ids[:, :-1], labels=ids[:, 1:])
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.logits, reference.logits)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b)


def test_per_block_compile_traces_the_gpu_paths_whole() -> None:
    """The flex + grouped block traces without graph breaks (what the CUDA training run compiles; bf16,
    since grouped_mm's shape rules insist on it when traced)."""
    torch.manual_seed(0)
    model = PanguModel(small("topk", num_experts=4, topk_k=2, capacity_factor=0.5)).eval().to(torch.bfloat16)
    model.set_attention_backend("flex").set_expert_backend("grouped")
    ids = packed_ids()
    with torch.no_grad():
        reference = model(ids).logits
        maybe_compile(model, True, backend="aot_eager", fullgraph=True)
        compiled = model(ids).logits
    torch.testing.assert_close(compiled.float(), reference.float(), atol=2e-2, rtol=2e-2)


# --- on a GPU ---------------------------------------------------------------------------------------
def gpu_model(router: str = "rre", **overrides) -> PanguModel:
    config = small(router, d_model=128, num_heads=2, d_ff=256, max_seq_len=256, dropout=0.0, **overrides)
    torch.manual_seed(0)
    return PanguModel(config).cuda()


def gpu_batch(length: int = 256):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (4, length + 1), generator=generator)
    ids[0, [40, 170]] = EOT
    ids[1, 129] = EOT
    return ids[:, :-1].cuda(), ids[:, 1:].cuda(), torch.tensor([0, 1, 2, 3]).cuda()


@cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_training_paths_match_the_reference_paths() -> None:
    """bf16 autocast: flex + grouped_mm against SDPA (dense mask) + loop, same weights, dropout 0."""
    model = gpu_model(num_domains=4, experts_per_domain=2).train()
    ids, labels, domains = gpu_batch()
    results = {}
    for attention, experts in (("sdpa", "loop"), ("auto", "auto")):
        model.set_attention_backend(attention).set_expert_backend(experts)
        with autocast("cuda", "bf16"):
            out = model(ids, domain_ids=domains, labels=labels)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        results[attention] = (out.loss.float(), grads)
    assert expert_backend(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) == "grouped"
    torch.testing.assert_close(results["auto"][0], results["sdpa"][0], atol=2e-2, rtol=2e-2)
    for a, b in zip(results["auto"][1], results["sdpa"][1]):
        if a is not None and b is not None:
            torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_training_step_does_not_synchronise() -> None:
    model = gpu_model("topk", num_experts=4, topk_k=2, capacity_factor=0.5).train()
    rre = gpu_model(num_domains=4, experts_per_domain=2).train()
    ids, labels, domains = gpu_batch()
    for net in (model, rre):
        for warm in (True, False):  # the first call compiles FlexAttention (which may sync)
            if not warm:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with autocast("cuda", "bf16"):
                    out = net(ids, domain_ids=domains, labels=labels)
                out.loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compiled_blocks_train() -> None:
    configure_cuda_matmul()
    model = maybe_compile(gpu_model(num_domains=4, experts_per_domain=2).train(), True)
    ids, labels, domains = gpu_batch()
    for _ in range(2):
        with autocast("cuda", "bf16"):
            out = model(ids, domain_ids=domains, labels=labels)
        out.loss.backward()
    assert torch.isfinite(out.loss)


# --- per-domain losses from the model's own pass ---------------------------------------------------
def test_per_domain_losses_come_from_the_models_label_losses() -> None:
    """`domain_loss_sums` adds up `ModelOutput.token_loss` (no second cross-entropy over the logits, no
    boolean indexing that waits for the device): equal to the cross-entropy of each domain's labels,
    <pad> and -100 labels left out, and the mean of the same losses is `lm_loss`."""
    from pangu_model.metrics import domain_loss_sums

    config = small()
    torch.manual_seed(0)
    model = PanguModel(config).eval()
    ids = packed_ids(length=24)
    labels = ids.roll(-1, dims=1)
    labels[0, :5] = -100
    labels[2, 7] = config.pad_token_id
    domain_ids = torch.tensor([2, 0, 2])[:, None].expand_as(ids)
    out = model(ids, labels=labels)
    sums = domain_loss_sums(out.token_loss, labels, domain_ids, 4, config.pad_token_id)
    counted = (labels != -100) & (labels != config.pad_token_id)
    every = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, VOCAB), labels.reshape(-1).clamp(min=0),
                                              reduction="none").reshape(labels.shape)
    for domain in range(4):
        rows = (domain_ids == domain) & counted
        assert sums[domain, 1] == rows.sum()
        torch.testing.assert_close(sums[domain, 0].float(), every[rows].sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.lm_loss, every[counted].mean())


@cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_per_domain_losses_do_not_synchronise() -> None:
    from pangu_model.metrics import domain_loss_sums

    model = gpu_model(num_domains=4, experts_per_domain=2).train()
    ids, labels, domains = gpu_batch()
    with autocast("cuda", "bf16"):
        out = model(ids, domain_ids=domains, labels=labels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = domain_loss_sums(out.token_loss, labels, domains[:, None].expand_as(labels), 4,
                                model.config.pad_token_id)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(sums[:, 1].sum()) == int((labels != model.config.pad_token_id).sum())


# --- pinned host memory at its size ---------------------------------------------------------------
def test_exact_pinned_blocks_leave_a_users_allocator_settings_alone(monkeypatch) -> None:
    from pangu_model import pinned

    applied = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", applied.append)
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "")
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert pinned.exact_pinned_blocks() and applied == [pinned.SETTINGS]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # applying would reset theirs
    assert not pinned.exact_pinned_blocks() and applied == [pinned.SETTINGS]


@cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_large_pinned_blocks_are_pinned_at_their_size() -> None:
    """The caching host allocator pinned 128 MiB for a 65 MiB tensor (ECSS's host state at sigma-1t widths:
    up to twice the planner's figure)."""
    from pangu_model.pinned import EXACT_ABOVE_MB, exact_pinned_blocks

    if not exact_pinned_blocks():
        pytest.skip("this torch has no pinned size settings, or the allocators are configured by the user")
    size = (EXACT_ABOVE_MB + 1) * 2**20 + 1
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    block = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    assert block.is_pinned()
    assert torch.cuda.host_memory_stats()["allocated_bytes.current"] - before == size
    device = block.fill_(7).to("cuda", non_blocking=True)
    assert int(device.sum()) == 7 * size
