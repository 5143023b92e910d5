"""Shared-base EMA teacher: only trainable tensors have EMA copies, frozen ones are the student's own."""

import pytest
import torch
from torch import nn

from engine.errors import UserError
from engine.model.tokens import forward_tokens
from engine.objectives.dino_head import DINOHead
from engine.objectives.teacher import EMATeacher, eval_mode, teacher_memory
from tests.engine.objectives.conftest import ClsToken


def _setup(tiny_vit):
    torch.manual_seed(0)
    vit = tiny_vit()
    head = DINOHead(vit.embed_dim, out_dim=16, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    return vit, head, EMATeacher({"vit": vit, "head": head})


def _perturb_trainable(*modules):
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)


def test_ema_tracks_only_trainable_tensors(tiny_vit):
    vit, head, teacher = _setup(tiny_vit)
    teacher.ensure_initialized()
    trainable = [f"vit.{n}" for n, p in vit.named_parameters() if p.requires_grad] + [
        f"head.{n}" for n, _ in head.named_parameters()
    ]
    assert teacher.names == trainable
    n_train = sum(p.numel() for m in (vit, head) for p in m.parameters() if p.requires_grad)
    n_all = sum(p.numel() for m in (vit, head) for p in m.parameters())
    assert teacher.nbytes() == 4 * n_train < 4 * n_all
    rep = teacher_memory({"vit": vit, "head": head})
    assert rep["shared_bytes"] == teacher.nbytes() and rep["naive_bytes"] == 4 * n_all
    assert not teacher.partitioned


def test_frozen_tensors_share_storage_and_student_is_restored(tiny_vit):
    vit, head, teacher = _setup(tiny_vit)
    teacher.ensure_initialized()
    _perturb_trainable(vit, head)  # student moves away from the EMA
    frozen = {n: (p.data_ptr(), p.detach().clone()) for n, p in vit.named_parameters() if not p.requires_grad}
    student = {n: p.detach().clone() for n, p in vit.named_parameters() if p.requires_grad}
    with teacher.swapped():
        for n, p in vit.named_parameters():
            if n in frozen:
                assert p.data_ptr() == frozen[n][0]  # the very same storage: nothing duplicated
                assert torch.equal(p, frozen[n][1])
            else:
                idx = teacher.names.index(f"vit.{n}")
                assert torch.equal(p, teacher.ema[idx].to(p.dtype))
                assert not torch.equal(p, student[n])
    for n, p in vit.named_parameters():
        if n in student:
            assert torch.equal(p, student[n])  # bitwise restore


def test_ema_update_moves_only_trainable_tensors(tiny_vit):
    vit, head, teacher = _setup(tiny_vit)
    teacher.ensure_initialized()
    before = [e.clone() for e in teacher.ema]
    frozen_before = {n: p.detach().clone() for n, p in vit.named_parameters() if not p.requires_grad}
    _perturb_trainable(vit, head)
    teacher.update(0.9)
    for e0, e1, p in zip(before, teacher.ema, teacher.params):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * p.detach().float())
    for n, p in vit.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])
    snap = [e.clone() for e in teacher.ema]
    teacher.update(1.0)  # final momentum: frozen teacher
    assert all(torch.equal(a, b) for a, b in zip(snap, teacher.ema))


def test_teacher_pass_equals_functional_call_with_ema_values(tiny_vit):
    vit, head, teacher = _setup(tiny_vit)
    teacher.ensure_initialized()
    _perturb_trainable(vit, head)
    teacher.update(0.5)
    _perturb_trainable(vit, head)
    x = torch.randn(3, 3, 42, 42)
    with teacher.teacher_mode():
        got = head(forward_tokens(vit, x)["cls"])
    # reference: the student modules called with the EMA tensors substituted (names "vit.*", "head.*")
    ema = dict(zip(teacher.names, teacher.ema))
    head_over = {n[len("head.") :]: v for n, v in ema.items() if n.startswith("head.")}
    with torch.no_grad(), eval_mode([vit, head]):
        cls = torch.func.functional_call(ClsToken(vit), {n: v for n, v in ema.items() if n.startswith("vit.")}, (x,))
        ref = torch.func.functional_call(head, head_over, (cls,))
    torch.testing.assert_close(got, ref)
    # and it differs from the student
    with torch.no_grad():
        assert not torch.allclose(got, head(forward_tokens(vit, x)["cls"]))


def test_teacher_mode_is_deterministic_and_restores_train_flags(tiny_vit):
    torch.manual_seed(0)
    vit = tiny_vit()
    vit.blocks[0].drop_path1 = nn.Dropout(0.5)  # stochastic layer: the teacher must not use it
    vit.train()
    vit.blocks[1].eval()  # a submodule deliberately in eval stays so
    teacher = EMATeacher({"vit": vit})
    x = torch.randn(2, 3, 42, 42)
    with teacher.teacher_mode():
        a = forward_tokens(vit, x)["cls"]
        b = forward_tokens(vit, x)["cls"]
        assert not vit.training
    torch.testing.assert_close(a, b)
    assert vit.training and vit.blocks[0].training and not vit.blocks[1].training


def _zero3_like(lin: nn.Linear, gathered: bool = False):
    """Mimic a ZeRO-3 parameter: the values live in a flat local shard ``ds_tensor``; p.data is
    empty outside forward."""
    for p in lin.parameters():
        shard = p.detach().reshape(-1)[: max(1, p.numel() // 2)].clone()
        p.ds_tensor = shard
        if not gathered:
            p.data = torch.empty(0)


def test_zero3_shards_are_the_ema_home():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    _zero3_like(lin)
    teacher = EMATeacher({"lin": lin})
    teacher.ensure_initialized()
    assert teacher.partitioned
    assert [e.shape for e in teacher.ema] == [p.ds_tensor.shape for p in lin.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.ds_tensor.add_(1.0)  # optimizer step updates the shard
    teacher.update(0.75)
    for e, p in zip(teacher.ema, lin.parameters()):
        torch.testing.assert_close(e, p.ds_tensor - 0.75)
    student = [p.ds_tensor.clone() for p in lin.parameters()]
    with teacher.swapped():
        for e, p in zip(teacher.ema, lin.parameters()):
            assert torch.equal(p.ds_tensor, e)  # the gather hooks would read the teacher shard
    for s, p in zip(student, lin.parameters()):
        assert torch.equal(p.ds_tensor, s)


def test_zero3_gathered_parameter_is_refused():
    lin = nn.Linear(4, 3)
    _zero3_like(lin, gathered=True)  # e.g. a persistent or prefetched parameter
    teacher = EMATeacher({"lin": lin})
    with pytest.raises(RuntimeError, match="stage3_max_reuse_distance"):
        with teacher.swapped():
            pass


def test_state_dict_roundtrip_before_and_after_init(tiny_vit):
    vit, head, teacher = _setup(tiny_vit)
    teacher.ensure_initialized()
    _perturb_trainable(vit, head)
    teacher.update(0.0)  # EMA := student
    state = {
        k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in teacher.state_dict().items()
    }

    torch.manual_seed(1)
    vit2, head2 = tiny_vit(), DINOHead(vit.embed_dim, out_dim=16, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    fresh = EMATeacher({"vit": vit2, "head": head2})
    fresh.load_state_dict(state)  # before the first use: applied at initialisation
    fresh.ensure_initialized()
    for n, e in zip(fresh.names, fresh.ema):
        assert torch.equal(e, state["ema"][n])
    bad = dict(state, ema=dict(list(state["ema"].items())[1:]))
    with pytest.raises(UserError, match="missing"):
        fresh.load_state_dict(bad)
