"""bf16 3x3 conv of a CIFAR ResNet-20 layer's activation, NCHW against channels_last: forward (autograd on) and
convolution_backward (input and weight gradients), the mean of 50 calls after 5 warm-up calls, in us (`python conv_layout_s18.py THREADS`)."""
import platform, sys, time
import torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
def t(f, n=50):
    for _ in range(5): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e6
print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, bf16")
for C, H in [(16, 32), (32, 16), (64, 8)]:
    row = []
    for cl in (False, True):
        x = torch.randn(128, C, H, H).bfloat16()
        w = torch.randn(C, C, 3, 3).bfloat16()
        if cl:
            x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        forward = t(lambda: F.conv2d(xr, wr, None, 1, 1))
        g = torch.randn_like(F.conv2d(xr, wr, None, 1, 1))
        backward = t(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]))
        row.append(f"{'channels_last' if cl else 'NCHW'} forward {forward:.0f} backward {backward:.0f}")
    print(f"{C} channels {H}x{H}: " + "; ".join(row))
