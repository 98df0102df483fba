"""Convolutions in pieces (pipeline/reconstruct/pieces.py): the same output as the whole
convolution, pieces actually taken, the cases it must leave whole, and reconstruct using it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.reconstruct.pieces import ConvolutionPieces, pieces_for


@pytest.mark.parametrize("padding, dilation, kernel", [(1, 1, 3), (0, 1, 3), (2, 2, 3), ((2, 1, 0), 1, (5, 3, 1)),
                                                       (0, 1, 1)])
def test_pieces_equal_the_whole_convolution(padding, dilation, kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 23, 9, 7)
    w = torch.randn(5, 3, *((kernel,) * 3 if isinstance(kernel, int) else kernel))
    b = torch.randn(5)
    ref = F.conv3d(x, w, b, padding=padding, dilation=dilation)
    with torch.no_grad(), ConvolutionPieces(voxels=4 * 9 * 7) as cp:
        out = F.conv3d(x, w, b, padding=padding, dilation=dilation)
    assert cp.calls == 1 and cp.pieces >= 3
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pieces_equal_in_float64_and_strided_planes():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 17, 12, 10, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, 3, dtype=torch.float64)  # groups 2
    ref = F.conv3d(x, w, None, stride=(1, 2, 2), padding=1, groups=2)
    with torch.no_grad(), ConvolutionPieces(voxels=30) as cp:
        out = F.conv3d(x, w, None, stride=(1, 2, 2), padding=1, groups=2)
    assert cp.pieces > 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_transposed_pieces_and_a_unet_pass():
    from pipeline.models import UNet3D

    torch.manual_seed(2)
    x = torch.randn(1, 4, 10, 6, 6)
    w = torch.randn(4, 3, 2, 2, 2)
    ref = F.conv_transpose3d(x, w, torch.randn(3).zero_(), stride=2)
    with torch.no_grad(), ConvolutionPieces(voxels=2 * 12 * 12 * 2) as cp:
        out = F.conv_transpose3d(x, w, torch.zeros(3), stride=2)
    assert cp.pieces == 5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    net = UNet3D(in_channels=2, out_channels=2, widths=[4, 8]).eval()
    img = torch.randn(1, 2, 12, 20, 16)
    with torch.no_grad():
        whole = net(img)
        with ConvolutionPieces(voxels=200) as cp:
            pieced = net(img)
    assert cp.calls >= 8
    torch.testing.assert_close(pieced, whole, rtol=1e-5, atol=1e-5)


def test_left_whole_when_it_cannot_or_need_not_split():
    x = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, 3)
    with ConvolutionPieces(voxels=8) as cp:  # gradients wanted: whole
        y = F.conv3d(x, w, padding=1)
        F.conv3d(x.detach(), w, padding="same")  # string padding: whole
        F.conv3d(x.detach(), w, stride=2)  # strided along dim 2: whole
        F.conv_transpose3d(x.detach(), w.transpose(0, 1), stride=1)  # overlapping transposed: whole
    assert cp.calls == 0
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad(), ConvolutionPieces(voxels=10 ** 6) as cp:  # small: whole
        F.conv3d(x, w, padding=1)
    assert cp.calls == 0
    with pytest.raises(ValueError, match="positive"):
        ConvolutionPieces(voxels=0)
    with pieces_for("cpu") as mode:
        assert isinstance(mode, ConvolutionPieces)
    with pieces_for("meta") as mode:
        assert mode is None


def test_pieces_for_keeps_a_lean_job_lean_afterwards():
    """In a lean job the pieces' buffers come from the heap while the pass runs; afterwards the
    lean setting is back: a large freed block goes back to the OS at once (checked on RSS, in a
    fresh interpreter, since the allocator's settings are process-wide)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from pipeline.allocator import return_freed_memory_to_os\n"
        "from pipeline.reconstruct.pieces import pieces_for\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10\n"
        "assert return_freed_memory_to_os()\n"
        "with torch.no_grad(), pieces_for('cpu') as mode:\n"
        "    y = torch.nn.functional.conv3d(torch.randn(1, 2, 64, 64, 64), torch.randn(4, 2, 3, 3, 3), padding=1)\n"
        "assert mode.pieces > 1\n"
        "del y\n"
        "before = rss()\n"
        "big = torch.ones(16 << 20)  # 64 MiB\n"
        "del big\n"
        "small = [torch.ones(1 << 20) for _ in range(16)]  # 16 blocks of 4 MiB: mapped, not heap\n"
        "del small\n"
        "print(rss() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) < 16  # MiB kept after freeing 128 MiB
