import torch

from dpcam.data.augment import views


def test_views_are_view_major_flips_and_shifts_of_each_image():
    x = torch.rand(3, 2, 8, 8)
    v = views(x, 4, torch.Generator().manual_seed(0), shift=0)
    assert v.shape == (12, 2, 8, 8)
    for i in range(3):  # without shifts every view is the image or its mirror image
        for j in range(4):
            row = v[i * 4 + j]
            assert torch.equal(row, x[i]) or torch.equal(row, x[i].flip(-1))


def test_a_shift_is_a_crop_of_the_reflection_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(3)
    v = views(x, 5, g, shift=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for n in range(10):
        img = padded[n // 5]
        crops = [
            c
            for dy in range(5)
            for dx in range(5)
            for c in (img[:, dy : dy + 6, dx : dx + 6], img[:, dy : dy + 6, dx : dx + 6].flip(-1))
        ]
        assert any(torch.equal(v[n], c) for c in crops), n


def test_views_are_reproducible_from_the_generator():
    x = torch.rand(4, 3, 16, 16)
    a = views(x, 2, torch.Generator().manual_seed(7), shift=1)
    b = views(x, 2, torch.Generator().manual_seed(7), shift=1)
    assert torch.equal(a, b) and not torch.equal(a, views(x, 2, torch.Generator().manual_seed(8), shift=1))
