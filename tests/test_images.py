import numpy as np
import pytest
from PIL import Image, ImageOps

from visionqc.images import orientation_mapper, smart_resize, upright_size


@pytest.mark.parametrize("orient", range(1, 9))
def test_orientation_mapper_matches_pil_exif_transpose(orient):
    raw = np.zeros((30, 50, 3), dtype=np.uint8)  # stored frame: 50 wide, 30 high
    raw[7, 11] = 255  # one marked pixel at x=11, y=7
    image = Image.fromarray(raw)
    exif = image.getexif()
    exif[0x0112] = orient
    image.info["exif"] = exif.tobytes()
    upright = np.asarray(ImageOps.exif_transpose(image))
    assert (upright.shape[1], upright.shape[0]) == upright_size((50, 30), orient)
    y, x = np.argwhere(upright[:, :, 0] == 255)[0]
    # map the pixel's centre, then back to the pixel index
    mx, my = orientation_mapper(orient, (50, 30))(11.5, 7.5)
    assert (int(mx), int(my)) == (x, y)


@pytest.mark.parametrize("size", [(128, 128), (728, 532), (1920, 934), (31, 2000), (4000, 3000), (10, 10)])
@pytest.mark.parametrize("budget", [(4096, 1024 * 1024), (64 * 32 * 32, 256 * 32 * 32)])
def test_smart_resize_matches_qwen_vl_utils(size, budget):
    from qwen_vl_utils.vision_process import smart_resize as reference

    height, width = size
    assert smart_resize(height, width, 32, *budget) == reference(height, width, 32, *budget)
