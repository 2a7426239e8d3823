"""SplicePlan: every index map against the per-row construction of tests/strategies.py, plus its errors."""
from __future__ import annotations

import dataclasses
import importlib
import pickle

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import PlanSpec, plan_specs, random_spec, spliced_rows

from cmcaug import plan as plan_module
from cmcaug.errors import InputError
from cmcaug.kernels import index_maps, splice
from cmcaug.plan import PAD_SOURCE, SplicePlan

splice_module = importlib.import_module("cmcaug.kernels.splice")  # `cmcaug.kernels.splice` names the function


def expected_maps(spec: PlanSpec) -> dict[str, np.ndarray]:
    """The plan's maps, written out from `spliced_rows`, one output token at a time."""
    rows = spliced_rows(spec)
    batch, width, k = len(rows), spec.width, spec.patch_tokens
    out_width = max(len(row) for row in rows)
    slots = sum(kind == "patch" for row in rows for kind, _, _ in row) // k
    maps = {
        "source_index": np.full((batch, out_width), PAD_SOURCE, np.int64),
        "text_destination": np.full((batch, width), -1, np.int64),
        "patch_destination": np.full((slots, k), -1, np.int64),
        "modality_ids": np.zeros((batch, out_width), np.int64),
        "position_ids": np.zeros((batch, out_width), np.int64),
        "slot_rows": np.zeros(slots, np.int64),
    }
    for b, row in enumerate(rows):
        for t, (kind, i, j) in enumerate(row):
            maps["position_ids"][b, t] = t
            if kind == "text":
                maps["source_index"][b, t] = b * width + i
                maps["text_destination"][b, i] = b * out_width + t
            else:
                maps["source_index"][b, t] = -(i * k + j) - 1
                maps["patch_destination"][i, j] = b * out_width + t
                maps["modality_ids"][b, t] = 1
                maps["slot_rows"][i] = b
    maps["attention_mask"] = (maps["source_index"] != PAD_SOURCE).astype(np.int64)
    maps["output_lengths"] = np.array([len(row) for row in rows])
    maps["slots_per_row"] = np.bincount(maps["slot_rows"], minlength=batch)
    maps["slot_span_index"] = np.concatenate([np.arange(n) for n in maps["slots_per_row"]]).astype(np.int64)
    return maps


def assert_plan_matches(spec: PlanSpec, plan: SplicePlan) -> None:
    for name, expected in expected_maps(spec).items():
        actual = getattr(plan, name)
        actual = actual.cpu().numpy() if isinstance(actual, torch.Tensor) else actual
        assert actual.shape == expected.shape, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    for name in ("source_index", "text_destination", "patch_destination"):
        assert getattr(plan, name).dtype == torch.int32, name
    # Labels follow their text token; patch tokens and padding are ignored.
    labels = torch.arange(plan.batch_size * plan.text_length).reshape(plan.batch_size, plan.text_length) + 1000
    want = torch.full(plan.source_index.shape, -7, dtype=labels.dtype)
    for b, row in enumerate(spliced_rows(spec)):
        for t, (kind, j, _) in enumerate(row):
            if kind == "text":
                want[b, t] = labels[b, j]
    assert torch.equal(plan.remap_labels(labels, ignore_index=-7), want)


@settings(max_examples=600, deadline=None)
@given(plan_specs())
def test_maps_match_per_row_construction(spec: PlanSpec) -> None:
    assert_plan_matches(spec, spec.build())


@pytest.mark.parametrize("seed", range(40))
def test_large_random_plans_match_per_row_construction(seed: int) -> None:
    spec = random_spec(np.random.default_rng(seed), batch=64)  # 40 x 64 ragged rows in all
    assert_plan_matches(spec, spec.build())


def test_worked_example() -> None:
    # Row 0: "a [b c] [d] e" with K=2; row 1: entirely one span; row 2: empty.
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    pad = PAD_SOURCE
    assert plan.source_index.tolist() == [[0, -1, -2, -3, -4, 4], [-5, -6, pad, pad, pad, pad], [pad] * 6]
    assert plan.text_destination.tolist() == [[0, -1, -1, -1, 5], [-1] * 5, [-1] * 5]
    assert plan.patch_destination.tolist() == [[1, 2], [3, 4], [6, 7]]
    assert plan.modality_ids.tolist()[0] == [0, 1, 1, 1, 1, 0]
    assert plan.position_ids.tolist()[1] == [0, 1, 0, 0, 0, 0]
    assert (plan.batch_size, plan.text_length, plan.output_length, plan.num_slots, plan.patch_tokens) == (3, 5, 6, 3, 2)


def test_a_plan_is_what_the_kernels_read() -> None:
    """`SplicePlan` satisfies the kernels' `SpliceMaps` (whose sentinel it uses), with sizes in the maps' shapes."""
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2, text_length=6)
    assert PAD_SOURCE is index_maps.PAD_SOURCE
    for name in index_maps.SpliceMaps.__annotations__:
        assert isinstance(getattr(plan, name), torch.Tensor), name
    assert plan.source_index.shape == (plan.batch_size, plan.output_length)
    assert plan.text_destination.shape == (plan.batch_size, plan.text_length)
    assert plan.patch_destination.shape == (plan.num_slots, plan.patch_tokens)


def test_max_length_keeps_spans_that_do_not_fit_as_text() -> None:
    # The second patch would need positions 3..4 of 4: it stays text, and is truncated with the row.
    plan = SplicePlan.build([6], [[(1, 2), (3, 5)]], patch_tokens=2, max_length=4)
    assert plan.source_index.tolist() == [[0, -1, -2, 2]]
    assert plan.slots_per_row.tolist() == [1] and plan.num_slots == 1
    assert plan.text_destination.tolist() == [[0, -1, 3, -1, -1, -1]]


def test_text_length_pads_the_text_width() -> None:
    plan = SplicePlan.build([2, 1], [[(0, 1)], []], text_length=4)
    assert plan.text_length == 4
    assert plan.source_index.tolist() == [[-1, 1], [4, PAD_SOURCE]]


def test_accepts_numpy_inputs() -> None:
    spans = [np.array([[0, 2]]), np.zeros((0, 2), np.int32)]
    plan = SplicePlan.build(np.array([3, 2], np.int32), spans, patch_tokens=np.int64(3))
    assert plan.source_index.tolist() == [[-1, -2, -3, 2], [3, 4, PAD_SOURCE, PAD_SOURCE]]


def test_to_and_repr() -> None:
    plan = SplicePlan.build([3], [[(0, 1)]])
    moved = plan.to("cpu", non_blocking=True)
    assert moved.device == torch.device("cpu") and torch.equal(moved.source_index, plan.source_index)
    assert plan.attention_mask is plan.attention_mask  # derived maps: computed once per plan
    elsewhere = plan.to("meta")
    for name in ("source_index", "text_destination", "patch_destination", "attention_mask", "modality_ids",
                 "position_ids"):
        assert getattr(elsewhere, name).device.type == "meta", name
    assert plan.device == torch.device("cpu") and plan.attention_mask.device.type == "cpu"  # the original stays
    assert repr(plan) == (
        "SplicePlan(batch_size=1, text_length=3, output_length=3, num_slots=1, patch_tokens=1, device=cpu)"
    )


def _one_span_per_row(lengths: list[int]) -> PlanSpec:
    return PlanSpec(tuple(lengths), tuple(((0, 1),) if n else () for n in lengths), patch_tokens=2)


def _collate(lengths: list[int]) -> SplicePlan:
    return _one_span_per_row(lengths).build()


def test_plans_cross_dataloader_workers() -> None:
    """A collate function builds the plan in a worker process; the training process gets it intact."""
    loader = torch.utils.data.DataLoader([3, 0, 5, 1], batch_size=2, num_workers=1, collate_fn=_collate)
    for lengths, plan in zip(([3, 0], [5, 1]), loader):
        assert_plan_matches(_one_span_per_row(lengths), plan)


@pytest.mark.gpu
def test_pin_memory_and_to_cuda() -> None:
    plan = SplicePlan.build([4, 2], [[(1, 3)], [(0, 2)]], patch_tokens=3).pin_memory()
    assert plan.source_index.is_pinned() and plan.position_ids.is_pinned()
    moved = plan.to("cuda", non_blocking=True)
    assert moved.device.type == "cuda"
    assert torch.equal(moved.attention_mask.cpu(), plan.attention_mask)
    labels = torch.arange(8, device="cuda").reshape(2, 4)
    assert torch.equal(moved.remap_labels(labels).cpu(), plan.remap_labels(labels.cpu()))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([], []), {}, "non-empty"),
        (([3, -1], [[], []]), {}, ">= 0"),
        (([3.0], [[]]), {}, "integers"),
        (([3], []), {}, "one list of"),
        (([3], "ab"), {}, "one list of"),
        (([3], [[(0, 1, 2)]]), {}, "(start, end) pairs"),
        (([3], [[(1.5, 2)]]), {}, "integers"),
        (([3], [[(2, 2)]]), {}, "non-empty token range"),
        (([3], [[(2, 4)]]), {}, "inside the row's 3 tokens"),
        (([3], [[(-1, 1)]]), {}, "non-empty token range"),
        (([5], [[(2, 4), (3, 5)]]), {}, "sorted and non-overlapping"),
        (([5], [[(3, 4), (0, 1)]]), {}, "sorted and non-overlapping"),
        (([3], [[]]), {"patch_tokens": 0}, "patch_tokens"),
        (([3], [[]]), {"patch_tokens": True}, "patch_tokens"),
        (([3], [[]]), {"max_length": 0}, "max_length"),
        (([3], [[]]), {"text_length": 2}, "shorter than the longest row"),
        (([1], [[]]), {"text_length": 2**31}, "int32"),
    ],
)
def test_build_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SplicePlan.build(*args, **kwargs)


# -- hand-made plans ---------------------------------------------------------------------------------
def _fields(plan: SplicePlan) -> dict:
    """The constructor arguments that remake `plan` (copies, so a test may change them)."""
    values = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return {name: value.copy() if isinstance(value, np.ndarray) else value.clone() for name, value in values.items()}


def _set(name: str, position: tuple[int, int], value: int):
    def change(fields: dict) -> None:
        fields[name][position] = value
    return change


def _swap(name: str, a: tuple[int, int], b: tuple[int, int]):
    def change(fields: dict) -> None:
        fields[name][a], fields[name][b] = fields[name][b].clone(), fields[name][a].clone()
    return change


def _replace(name: str, make):
    def change(fields: dict) -> None:
        fields[name] = make(fields[name])
    return change


# The worked example's plan: B=3, L=5, L_out=6, M=3 slots of K=2; source_index row 0 is [0, -1, -2, -3, -4, 4].
BAD_PLANS = {
    "text row past B*L": (_set("source_index", (2, 0), 15), r"source_index\[2, 0\] reads text row 15, past the B\*L = 15 rows"),
    "patch row past M*K": (_set("source_index", (2, 0), -7), r"source_index\[2, 0\] reads patch row 6, past the M\*K = 6 rows"),
    "negative but not the sentinel": (_set("source_index", (2, 0), PAD_SOURCE + 1), "reads patch row 2147483646"),
    "destination past B*L_out": (_set("text_destination", (2, 4), 18), r"text_destination\[2, 4\] = 18 is neither -1"),
    "destination below -1": (_set("patch_destination", (0, 0), -2), r"patch_destination\[0, 0\] = -2 is neither -1"),
    "a text row read twice": (_set("source_index", (2, 0), 0),
                              r"source_index\[2, 0\] reads text row 0, whose text_destination is 0, not this output row \(12\)"),
    "a text row read by nobody": (_set("source_index", (0, 5), PAD_SOURCE),
                                  r"text_destination\[0, 4\] = 5, but that output row reads no text row, not 4"),
    "inverse maps swapped": (_swap("patch_destination", (0, 0), (0, 1)),
                             r"source_index\[0, 1\] reads patch row 0, whose patch_destination is 2, not"),
    "slot in another row": (_replace("slots_per_row", lambda s: np.array([1, 2, 0])), r"slot 1, which slots_per_row puts in row 1"),
    "slots do not add up": (_replace("slots_per_row", lambda s: np.array([2, 0, 0])), "sums to 2, but patch_destination has 3 slots"),
    "row counts of another batch": (_replace("text_lengths", lambda s: s[:2]), r"text_lengths must be an integer NumPy array of shape \(3"),
    "row counts not integers": (_replace("output_lengths", lambda s: s.astype(float)), "output_lengths must be an integer"),
    "output length past L_out": (_replace("output_lengths", lambda s: s + 3), r"output_lengths must lie in \[0, 6\]"),
    "int64 map": (_replace("source_index", lambda s: s.long()), "2-D int32 tensor"),
    "batch sizes disagree": (_replace("text_destination", lambda s: s[:2]), "disagree on the batch size"),
    "token map of another shape": (_replace("attention_mask", lambda s: s[:, :3]), "attention_mask must be a tensor shaped like"),
    "maps on two devices": (_replace("patch_destination", lambda s: s.to("meta")), "one device"),
    "slot spans of another plan": (_replace("slot_token_spans", lambda s: s[:2]),
                                   r"slot_token_spans must be an integer NumPy array of shape \(3, 2\)"),
    "slot spans not integers": (_replace("slot_token_spans", lambda s: s.astype(float)), "slot_token_spans must be an integer"),
    "slot span past its row": (_set("slot_token_spans", (2, 1), 4), r"slot_token_spans\[2\] = \(0, 4\) is not a non-empty token "
                               "range inside row 1's 3 tokens"),
    "empty slot span": (_set("slot_token_spans", (0, 1), 1), r"slot_token_spans\[0\] = \(1, 1\)"),
}


@pytest.mark.parametrize("case", BAD_PLANS)
def test_hand_made_bad_plans_are_refused_by_the_constructor(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when the plan is made, before any kernel could read out of bounds (the Triton gather does not check)."""
    change, message = BAD_PLANS[case]
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    fields = _fields(plan)
    change(fields)
    monkeypatch.setattr(splice_module, "_splice", _never("a kernel ran"))
    with pytest.raises(InputError, match=message):
        splice(torch.zeros(3, 5, 4), torch.zeros(3, 2, 4), SplicePlan(**fields))
    with pytest.raises(InputError, match=message):
        dataclasses.replace(plan, **fields)
    SplicePlan(**fields, validate=False)  # the caller's opt-out: then the maps are the caller's promise


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(what)
    return fail


@settings(max_examples=300, deadline=None)
@given(plan_specs(), st.data())
def test_any_single_changed_index_is_refused(spec: PlanSpec, data: st.DataObject) -> None:
    """Valid plans pass the constructor's checks as they are; changing any one entry of any index map breaks
    the maps' pairing (or a range), and is refused."""
    plan = spec.build()
    fields = _fields(plan)
    SplicePlan(**fields)
    names = [name for name in ("source_index", "text_destination", "patch_destination") if fields[name].numel()]
    assume(names)
    name = data.draw(st.sampled_from(names))
    flat = fields[name].view(-1)
    i = data.draw(st.integers(0, flat.numel() - 1))
    limit = max(plan.batch_size * max(plan.text_length, plan.output_length), plan.num_slots * plan.patch_tokens) + 2
    value = data.draw(st.sampled_from([PAD_SOURCE, -1]) | st.integers(-limit, limit))
    assume(value != int(flat[i]))
    flat[i] = value
    with pytest.raises(InputError):
        SplicePlan(**fields)


def test_build_to_and_pickling_skip_the_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans from `build` (and their copies on other devices) are valid by construction: no check runs."""
    monkeypatch.setattr(plan_module, "_check_plan", _never("a valid-by-construction plan was checked"))
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    assert plan.to("cpu").num_slots == plan.to("meta").num_slots == 3
    assert torch.equal(pickle.loads(pickle.dumps(plan)).source_index, plan.source_index)
    with pytest.raises(AssertionError, match="was checked"):
        SplicePlan(**_fields(plan))


def test_hand_made_plan_derives_its_token_maps() -> None:
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    fields = {name: value for name, value in _fields(plan).items() if name not in ("attention_mask", "modality_ids",
                                                                                   "position_ids")}
    remade = SplicePlan(**fields)
    for name in ("attention_mask", "modality_ids", "position_ids"):
        assert torch.equal(getattr(remade, name), getattr(plan, name)), name


def test_remap_labels_errors() -> None:
    plan = SplicePlan.build([3, 2], [[(0, 1)], []])
    with pytest.raises(InputError, match=r"shape \[B, L\] = \[2, 3\]"):
        plan.remap_labels(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match=r"patch_labels must be a tensor \[M, K\] = \[1, 1\]"):
        plan.remap_labels(torch.zeros(2, 3, dtype=torch.long), patch_labels=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(InputError, match="patch_labels are on meta"):
        plan.remap_labels(torch.zeros(2, 3, dtype=torch.long), patch_labels=torch.zeros(1, 1, dtype=torch.long, device="meta"))
    with pytest.raises(InputError, match=r"values must have shape \[B, L\] = \[2, 3\]"):
        plan.replaced_token_values(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="torch.Tensor"):
        plan.remap_labels(np.zeros((2, 3)))
    with pytest.raises(InputError, match="plan is on cpu"):
        plan.remap_labels(torch.zeros(2, 3, dtype=torch.long, device="meta"))


# -- patch-row targets: the words each slot replaced ----------------------------------------------------
def expected_patch_values(spec: PlanSpec, values: np.ndarray, ignore: int) -> np.ndarray:
    """[M, K] by hand: walk each row as `spliced_rows` does; a kept span's patch row i takes its i-th token."""
    k, cap, out = spec.patch_tokens, spec.max_length, []
    for b, spans in enumerate(spec.spans):
        written, j = 0, 0
        for start, end in spans:
            written += start - j
            if cap is None or written + k <= cap:
                out.append([values[b, start + i] if i < end - start else ignore for i in range(k)])
                written += k
            else:
                written += end - start
            j = end
    return np.array(out, np.int64).reshape(-1, k)


def assert_patch_values_match(spec: PlanSpec, plan: SplicePlan) -> None:
    values = torch.arange(plan.batch_size * plan.text_length).reshape(plan.batch_size, plan.text_length) + 1000
    want = expected_patch_values(spec, values.numpy(), -7)
    got = plan.replaced_token_values(values, ignore_index=-7)
    assert got.dtype == values.dtype and got.shape == (plan.num_slots, plan.patch_tokens)
    np.testing.assert_array_equal(got.numpy(), want)
    # remap_labels places patch row (m, k) where the output reads it; text and padding as without.
    patch_labels = -(torch.arange(plan.num_slots * plan.patch_tokens).reshape(plan.num_slots, plan.patch_tokens) + 50)
    layout = torch.full(plan.source_index.shape, -7, dtype=values.dtype)
    for b, row in enumerate(spliced_rows(spec)):
        for t, (kind, i, j) in enumerate(row):
            layout[b, t] = values[b, i] if kind == "text" else patch_labels[i, j]
    assert torch.equal(plan.remap_labels(values, ignore_index=-7, patch_labels=patch_labels), layout)


@settings(max_examples=300, deadline=None)
@given(plan_specs())
def test_replaced_token_values_match_per_row_construction(spec: PlanSpec) -> None:
    assert_patch_values_match(spec, spec.build())


@pytest.mark.parametrize("seed", range(20))
def test_replaced_token_values_of_large_random_plans(seed: int) -> None:
    spec = random_spec(np.random.default_rng(100 + seed), batch=64)  # spans shorter and longer than K, truncation
    assert_patch_values_match(spec, spec.build())


def test_replaced_token_values_worked_example() -> None:
    # Row 0: "a [b c] [d] e" with K=2: the first slot predicts b, c; the second d, then nothing.
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    assert plan.slot_token_spans.tolist() == [[1, 3], [3, 4], [0, 3]]
    values = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0], [0] * 5])
    assert plan.replaced_token_values(values).tolist() == [[11, 12], [13, -100], [20, 21]]  # 22: past K
    assert plan.remap_labels(values, patch_labels=plan.replaced_token_values(values)).tolist()[0] == [10, 11, 12, 13, -100, 14]
    k1 = SplicePlan.build([5], [[(1, 3)]])  # K = 1: the first sub-token
    assert k1.replaced_token_values(values[:1]).tolist() == [[11]]
    none = SplicePlan.build([2], [[]], patch_tokens=3)
    assert none.replaced_token_values(torch.ones(1, 2, dtype=torch.long)).shape == (0, 3)
    assert torch.equal(none.remap_labels(torch.ones(1, 2, dtype=torch.long), patch_labels=torch.zeros(0, 3, dtype=torch.long)),
                       torch.ones(1, 2, dtype=torch.long))


def test_slot_token_spans_follow_the_plan_and_are_optional() -> None:
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    for moved in (plan.to("cpu"), plan.to("meta"), pickle.loads(pickle.dumps(plan))):
        np.testing.assert_array_equal(moved.slot_token_spans, plan.slot_token_spans)
    assert plan.to("meta").replaced_token_values(torch.zeros(3, 5, dtype=torch.long, device="meta")).device.type == "meta"
    by_hand = SplicePlan(**{**_fields(plan), "slot_token_spans": None})  # made without them: still a valid plan
    assert by_hand.slot_token_spans is None and torch.equal(by_hand.remap_labels(torch.ones(3, 5)), plan.remap_labels(torch.ones(3, 5)))
    with pytest.raises(InputError, match="no slot_token_spans"):
        by_hand.replaced_token_values(torch.zeros(3, 5, dtype=torch.long))
    fields = {name: value for name, value in _fields(plan).items() if name != "slot_token_spans"}
    assert SplicePlan(**fields).slot_token_spans is None  # the default: older constructor calls still work
