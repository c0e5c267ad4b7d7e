"""Attention kernels on the DiT's joint attention (2 x 7017 tokens, 24 heads x 128): time, TFLOP/s, error."""
import math, torch, torch.nn.functional as F

def t(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n

B, S, H, D = 2, 7017, 24, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5  # a shared offset, as real keys have
v = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
flop = 4 * B * S * S * H * D
qs = slice(0, 512)
ref = F.scaled_dot_product_attention(q[:, qs].transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()).transpose(1, 2)
def err(out):
    out = out[:, qs].float()
    return ((out - ref).norm() / ref.norm()).item()
cases = {"cudnn sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)}
try:
    from flash_attn.cute import flash_attn_func
    def fa4():
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    cases["flash-attn-4 (cute, sm90)"] = fa4
except Exception as e:
    print("fa4 import failed:", repr(e)[:300])
try:
    from sageattention import sageattn
    cases["sageattention 1 (int8 QK, triton)"] = lambda: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
except Exception as e:
    print("sage import failed:", repr(e)[:300])
for name, fn in cases.items():
    try:
        out = fn()
        ms = t(fn)
        print(f"{name:40s} {ms:7.3f} ms {flop / ms / 1e9:6.0f} TFLOP/s  rel.err {err(out):.2e}")
    except Exception as e:
        print(name, "failed:", repr(e)[:400])
