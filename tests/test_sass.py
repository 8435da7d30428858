"""tools/sass.py (the hot-loop count) on hand-written SASS; tools/sass_report.py on the real CUDA kernels."""

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the development tools are not part of the package

import sass  # noqa: E402
import sass_report  # noqa: E402


def _listing(lines):
    """cuobjdump -sass text for one function from (opcode-and-operands) strings, 16 bytes apart."""
    body = [f"        /*{16 * k:04x}*/                   {text} ;   /* 0x0 */" for k, text in enumerate(lines)]
    return "\n\tcode for sm_90a\n\t\tFunction : kern\n" + "\n".join(body) + "\n"


# A loop (0x20 .. 0xb0) holding a Philox multiply and a guarded slow path with an inner loop
# (0x60 .. 0x80), entered by a branch the fast path skips; a NOP; an early exit outside.
LOOP = [
    "MOV R0, RZ",  # 0x00
    "@!P0 BRA 0xd0",  # 0x10  num == 0: skip the loop
    "IMAD.WIDE.U32 R2, R4, -0x2daee0ad, RZ",  # 0x20  loop head
    "FFMA R5, R2, R3, R5",  # 0x30
    "@!P1 BRA 0x90",  # 0x40  fast path: over the slow path
    "MOV R6, RZ",  # 0x50
    "IADD3 R6, R6, 0x1, RZ",  # 0x60  inner slow loop
    "ISETP.NE.AND P2, PT, R6, 0x5, PT",  # 0x70
    "@P2 BRA 0x60",  # 0x80
    "FADD R5, R5, R6",  # 0x90
    "NOP",  # 0xa0
    "@P3 BRA 0x20",  # 0xb0  back edge
    "STG.E [R8], R5",  # 0xc0
    "EXIT",  # 0xd0
]


def test_parse_finds_functions_guards_and_branch_targets():
    code = sass.parse_sass(_listing(LOOP))["kern"]
    assert len(code) == len(LOOP)
    assert code[1].guard == "@!P0" and code[1].opcode == "BRA" and code[1].branch_target == 0xD0
    assert code[0].branch_target is None and code[0].unconditional


def test_the_hot_loop_is_the_innermost_loop_with_philox_and_its_fast_path_is_counted():
    code = sass.parse_sass(_listing(LOOP))["kern"]
    assert sass.hot_region(code) == (2, 11, True)  # not the inner loop: it has no Philox multiply
    c = sass.count(code)
    # head, FFMA, the branch over the slow path, FADD, the back edge (the NOP is not counted)
    assert (c.per_iteration, c.barriers, c.is_loop) == (5, 0, True)


def test_a_loop_that_writes_memory_is_counted_through_a_store():
    lines = [
        "IMAD R1, R1, 0xcd9e8d57, RZ",  # 0x00  head
        "@!P0 BRA 0x40",  # 0x10  no rows: the store can be skipped
        "STG.E [R2], R1",  # 0x20  rows loop
        "@P1 BRA 0x20",  # 0x30
        "@P2 BRA 0x0",  # 0x40  back edge
        "EXIT",
    ]
    c = sass.count(sass.parse_sass(_listing(lines))["kern"])
    assert c.per_iteration == 5  # through the store once, not the 3 of skipping it


def test_a_kernel_without_a_loop_counts_from_entry_to_its_last_exit():
    lines = ["IMAD R1, R1, 0xcd9e8d57, RZ", "@P0 EXIT", "BAR.SYNC.DEFER_BLOCKING 0x0", "STG.E [R2], R1", "EXIT"]
    c = sass.count(sass.parse_sass(_listing(lines))["kern"])
    assert (c.per_iteration, c.barriers, c.is_loop) == (5, 1, False)


def test_philox_outside_every_loop_counts_the_whole_kernel_not_a_slow_path_loop():
    lines = [
        "IMAD R1, R1, 0xcd9e8d57, RZ",  # 0x00  the tile's noise, no loop
        "@!P0 BRA 0x40",  # 0x10  huge angle (never): a slow-path loop
        "IADD3 R6, R6, 0x1, RZ",  # 0x20
        "@P2 BRA 0x20",  # 0x30
        "STG.E [R2], R1",  # 0x40
        "EXIT",  # 0x50
    ]
    code = sass.parse_sass(_listing(lines))["kern"]
    assert sass.hot_region(code) == (0, 5, False)
    assert sass.count(code).per_iteration == 4  # over the slow path


def test_a_kernel_without_philox_counts_its_widest_loop():
    lines = ["MOV R0, RZ", "FADD R1, R1, R2", "@P0 BRA 0x10", "STG.E [R2], R1", "EXIT"]
    code = sass.parse_sass(_listing(lines))["kern"]
    assert sass.hot_region(code) == (1, 2, True)


def test_the_bound_is_the_issue_rate_over_instructions_per_element():
    row = sass_report.Row("cuda", "reduce/step", "normal", "float32", "k", "", 280, 4, 0, 40, 0, 0)
    assert row.per_element == 70
    assert row.bound == pytest.approx(132 * 4 * 32 * 1.98e9 / 70)
    (entry_reduce, entry_step) = sass_report.to_json([row])["kernels"]
    assert (entry_reduce["op"], entry_step["op"]) == ("reduce", "step")  # one CUDA kernel serves both


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_the_cuda_reduce_kernels_have_a_hot_loop_with_philox():
    rows = [r for r in sass_report.cuda_rows(ROOT) if r.op == "reduce/step"]
    assert {(r.stream, r.dtype) for r in rows} == {(s, d) for s in sass_report.STREAMS for d in sass_report.DTYPES}
    for r in rows:
        # One Philox4x32-10 is ~50 integer instructions; a normal also costs log, sincos and sqrt.
        assert 50 <= r.per_iteration <= 600 and r.spills == 0, r
