"""Probes for fusion choices (one card): GELU in the GEMM epilogue, attention input layouts."""
import torch, torch.nn.functional as F

def t(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n

d = "cuda"; bf = torch.bfloat16
x = torch.randn(14034, 3072, device=d, dtype=bf)
w = torch.randn(12288, 3072, device=d, dtype=bf) * 0.02
b = torch.randn(12288, device=d, dtype=bf)
ref = F.gelu(F.linear(x, w, b), approximate="tanh")
epi = torch._addmm_activation(b, x, w.t(), use_gelu=True)
print("gelu epilogue rel err vs tanh gelu", ((epi.float()-ref.float()).norm()/ref.float().norm()).item())
print("linear+gelu separate ms", t(lambda: F.gelu(F.linear(x, w, b), approximate="tanh")))
print("linear only ms", t(lambda: F.linear(x, w, b)))
print("addmm_activation gelu ms", t(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)))
cg = torch.compile(lambda x: F.gelu(F.linear(x, w, b), approximate="tanh"))
print("compiled linear+gelu ms", t(lambda: cg(x)))
q = torch.randn(2, 7017, 24, 128, device=d, dtype=bf)
k, v = torch.randn_like(q), torch.randn_like(q)
print("sdpa BSHD-transposed ms", t(lambda: F.scaled_dot_product_attention(q.transpose(1,2), k.transpose(1,2), v.transpose(1,2))))
qc, kc, vc = (a.transpose(1,2).contiguous() for a in (q,k,v))
print("sdpa BHSD-contiguous ms", t(lambda: F.scaled_dot_product_attention(qc, kc, vc)))
o = F.scaled_dot_product_attention(q.transpose(1,2), k.transpose(1,2), v.transpose(1,2))
print("sdpa out strides", o.stride(), o.transpose(1,2).is_contiguous())
