"""bench.sass: the SASS / res-usage / ptxas parsers on a checked-in snippet, and one real sm_80 compile when
nvcc is on PATH (CI has it)."""

from __future__ import annotations

import json
import shutil

import pytest

from prunedm.bench import sass

# Shaped like `cuobjdump -sass` output (encodings trimmed): an outer loop 0x40..0xb0 holding an inner loop
# 0x50..0x90 with two HMMA.SP, a forward branch inside it, and a loop without HMMA.SP after.
SNIPPET = """
\tcode for sm_80
\t\tFunction : _ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb0EEEvNS0_6ParamsIT_EE
\t.headerflags\t@"EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                       /* 0x00000a0000017a02 */
                                                                                /* 0x000fe40000000f00 */
        /*0010*/                   S2R R36, SR_CTAID.Y ;                        /* 0x0000000000247919 */
        /*0020*/                   IMAD.MOV.U32 R2, RZ, RZ, c[0x0][0x1a0] ;     /* 0x00006800ff1c7624 */
        /*0030*/                   ISETP.GE.U32.AND P0, PT, R2, 0x20, PT ;      /* 0x000000201c00780c */
        /*0040*/                   LDGSTS.E.BYPASS.128 [R3], [R4.64] ;          /* 0x0000000004037fae */
        /*0050*/                   LDSM.16.M88.4 R8, [R5] ;                     /* 0x000000000508783b */
        /*0060*/              @!P1 BRA 0x80 ;                                   /* 0x0000001000009947 */
        /*0070*/                   LDS R12, [R6] ;                              /* 0x000000000600c984 */
        /*0080*/                   HMMA.SP.16832.F32 R32, R8, R52, R32, R69.reuse, 0x0 ;  /* 0x000445340820723c */
        /*0090*/                   HMMA.SP.16832.F32 R28, R48, R52, R28, R69, 0x1 ;       /* 0x00054534301c723c */
        /*00a0*/              @P0 BRA 0x50 ;                                    /* 0xffffffa000000947 */
        /*00b0*/               @P2 BRA 0x40 ;                                   /* 0xffffff8000000947 */
        /*00c0*/                   IADD3 R0, R0, 0x1, RZ ;                      /* 0x0000000100007810 */
        /*00d0*/               @P3 BRA 0xc0 ;                                   /* 0xfffffff000000947 */
        /*00e0*/                   EXIT ;                                       /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                                    /* 0xfffffff000007947 */
\t\t..........
\t\tFunction : _Z5emptyv
        /*0000*/                   EXIT ;                                       /* 0x000000000000794d */
"""

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb0EEEvNS0_6ParamsIT_EE:
  REG:77 STACK:0 SHARED:25344 LOCAL:8 CONSTANT[2]:384 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS = """
ptxas info    : Compiling entry function '_ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb0EEEvNS0_6ParamsIT_EE' for 'sm_80'
ptxas info    : Function properties for _ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb0EEEvNS0_6ParamsIT_EE
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 77 registers, used 1 barriers, 25344 bytes smem, 592 bytes cmem[0], 384 bytes cmem[2]
"""  # noqa: E501

LINEAR_FP16 = "_ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb0EEEvNS0_6ParamsIT_EE"


def test_parse_sass_functions_and_instructions():
    functions = sass.parse_sass(SNIPPET)
    assert set(functions) == {LINEAR_FP16, "_Z5emptyv"}
    instrs = functions[LINEAR_FP16]
    assert len(instrs) == 16 and instrs[0] == (0, "MOV R1, c[0x0][0x28]")
    assert sass.opcode("@!P1 BRA 0x80") == "BRA" and sass.opcode(instrs[8][1]) == "HMMA.SP.16832.F32"
    assert sass.branch_target("@P0 BRA 0x50") == 0x50 and sass.branch_target("LDS R12, [R6]") is None
    assert functions["_Z5emptyv"] == [(0, "EXIT")]


def test_hottest_loop_is_the_innermost_one_holding_hmma_sp():
    loop = sass.hottest_loop(sass.parse_sass(SNIPPET)[LINEAR_FP16])
    # 0x50..0xa0: LDSM, BRA, LDS, 2 HMMA.SP, BRA -> 6 instructions, 4 others per 2 HMMA.SP.
    assert (loop["start"], loop["end"], loop["instructions"], loop["hmma_sp"]) == ("0x50", "0xa0", 6, 2)
    assert loop["other_per_hmma_sp"] == 2.0 and loop["calls"] == 0
    assert loop["top_other_opcodes"] == {"BRA": 2, "LDSM": 1, "LDS": 1}
    assert sass.hottest_loop([(0, "IADD3 R0, R0, 0x1, RZ"), (16, "BRA 0x0")]) is None


def test_resources_spills_and_labels():
    assert sass.parse_res_usage(RES_USAGE) == {LINEAR_FP16: {"registers": 77, "stack": 0, "shared": 25344, "local": 8}}
    assert sass.parse_ptxas_spills(PTXAS) == {LINEAR_FP16: {"spill_stores": 12, "spill_loads": 4}}
    assert sass.kernel_label(LINEAR_FP16) == "sparse_gemm_kernel<fp16, linear>"
    conv_bf16 = "_ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI13__nv_bfloat16Lb1EEEvNS0_6ParamsIT_EE"
    assert sass.kernel_label(conv_bf16) == "sparse_gemm_kernel<bf16, conv>"
    split = "_ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb0ELb1EEEvNS0_6ParamsIT_EE"
    assert sass.kernel_label(split) == "sparse_gemm_kernel<fp16, linear, split-k>"
    assert sass.kernel_label(split.replace("Lb0ELb1E", "Lb1ELb0E")) == "sparse_gemm_kernel<fp16, conv>"
    reduce = "_ZN7prunedm16sparse_gemm_cuda21split_k_reduce_kernelI6__halfEEvNS0_6ParamsIT_EEi"
    assert sass.kernel_label(reduce) == "split_k_reduce_kernel<fp16>"
    (row,) = [r for r in sass.analyze(SNIPPET, RES_USAGE, PTXAS, "sm_80") if r["function"] == LINEAR_FP16]
    assert (row["registers"], row["local"], row["spill_stores"], row["hottest_loop"]["hmma_sp"]) == (77, 8, 12, 2)


def test_markdown_and_json_written(tmp_path):
    rows = sass.analyze(SNIPPET, RES_USAGE, PTXAS, "sm_80")
    env = {"nvcc": "V0", "commit": "abc", "date": "now", "source": "x.cu", "flags": ["-O3"]}
    json_path, md_path = sass.write(tmp_path, "t", env, rows)
    assert json.loads(json_path.read_text())["rows"][0]["arch"] == "sm_80"
    expected = "| sm_80 | sparse_gemm_kernel<fp16, linear> | 77 | 12/4 | 8 | 25344 | 6 | 2 | 2.0 | 0 |"
    assert expected in md_path.read_text()


def test_bad_arch_is_refused(capsys):
    with pytest.raises(SystemExit):
        sass.main(["--arch", "80"])
    assert "--arch: expected an nvcc arch like sm_80" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None or sass.find_cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_real_sm80_compile():
    env, rows = sass.measure(("sm_80",))
    assert env["nvcc"].startswith("V")
    labels = {r["kernel"] for r in rows}
    assert {"sparse_gemm_kernel<fp16, linear>", "sparse_gemm_kernel<bf16, conv>"} <= labels
    assert "sparse_gemm_kernel<fp16, linear, split-k>" in labels and "split_k_reduce_kernel<fp16>" in labels
    for row in rows:
        loop = row["hottest_loop"]
        if row["kernel"].startswith("split_k_reduce_kernel"):  # no mma.sp: no hot loop to read
            assert loop is None
        else:
            assert loop is not None and loop["hmma_sp"] >= 8, row["kernel"]
        assert row["local"] == 0 and row["spill_stores"] == 0 and row["registers"] <= 255
