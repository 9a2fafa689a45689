import pytest
import torch

from mdeq.core import StatePacker
from mdeq.core.state import is_channels_last

CL = torch.channels_last


def test_channels_last_state_packs_without_copy_and_unpacks_channels_last():
    z = torch.randn(3, 5, 4, 6).contiguous(memory_format=CL)
    packer = StatePacker(z)
    flat = packer.pack(z)
    assert flat.shape == (3, 5 * 4 * 6) and flat.data_ptr() == z.data_ptr()  # a view: nothing copied
    back = packer.unpack(flat)
    assert is_channels_last(back) and torch.equal(back, z)


def test_mixed_formats_round_trip_and_solver_order_is_the_packers_business():
    zs = [torch.randn(2, 3, 8, 8).contiguous(memory_format=CL), torch.randn(2, 6, 4, 4), torch.randn(2, 7)]
    packer = StatePacker(zs)
    flat = packer.pack(zs)
    back = packer.unpack(flat)
    assert is_channels_last(back[0]) and not is_channels_last(back[1])
    for a, b in zip(back, zs):
        assert torch.equal(a, b)
    # a state in the other layout (e.g. a gradient) packs to the same entries: the layout is a storage detail
    again = packer.pack([zs[0].contiguous(), zs[1].contiguous(memory_format=CL), zs[2]])
    assert torch.equal(again, flat)
    # per-sample norms do not depend on the order of a row's entries
    nchw = StatePacker([t.contiguous() for t in zs]).pack([t.contiguous() for t in zs])
    torch.testing.assert_close(flat.norm(dim=1), nchw.norm(dim=1))


@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (2, 1, 3, 3)])
def test_size_one_dims_count_as_plain_contiguous(shape):
    t = torch.randn(shape).contiguous(memory_format=CL)
    assert not is_channels_last(t)
