import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label, trainId2label
from cityscapesscripts.helpers.labels import labels as cs_labels

from dasslab import labels as L


def test_classes_and_palette_come_from_cityscapesscripts():
    assert len(L.CLASS_NAMES) == 19
    for tid, name in enumerate(L.CLASS_NAMES):
        assert trainId2label[tid].name == name
        assert tuple(L.PALETTE[tid]) == trainId2label[tid].color
        assert L.TRAIN_TO_ID[tid] == trainId2label[tid].id
    assert L.CLASS_NAMES[:3] == ("road", "sidewalk", "building") and L.CLASS_NAMES[-1] == "bicycle"


def test_label_ids_to_train_ids_match_the_official_definition():
    ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    out = L.label_ids_to_train(ids)
    assert out.dtype == np.uint8
    for i in range(34):
        want = id2label[i].trainId
        want = want if 0 <= want < 255 else 255
        assert out.ravel()[i] == want, id2label[i].name
    assert L.label_ids_to_train(np.array([255], np.uint8))[0] == 255
    # the python table's license plate has id -1 and train id -1: ignored, never a class
    assert all(lab.trainId in range(19) or L.ID_TO_TRAIN_LUT[lab.id] == 255 for lab in cs_labels if lab.id >= 0)


def test_values_outside_the_table_raise_naming_values_and_file():
    bad = np.array([[7, 34], [200, 26]], np.uint8)
    with pytest.raises(ValueError, match=r"34, 200.*gta5/labels/00001.png"):
        L.label_ids_to_train(bad, path="gta5/labels/00001.png")
    with pytest.raises(ValueError, match="19"):
        L.check_train_ids(np.array([0, 18, 19, 255]))
    with pytest.raises(ValueError, match="23"):
        L.synthia_to_train(np.array([[1, 23]], np.uint16))
    with pytest.raises(ValueError, match="-3"):
        L.label_ids_to_train(np.array([-3, 7]))
    with pytest.raises(ValueError, match="dtype"):
        L.label_ids_to_train(np.array([0.5]))


def test_train_ids_round_trip_through_label_ids():
    train = np.array([*range(19), 255], np.uint8)
    ids = L.train_to_label_ids(train)
    assert ids[-1] == L.UNLABELED_ID == 0
    assert (L.label_ids_to_train(ids) == train).all()
    # and id -> train -> id is the identity on the ids of the 19 classes
    assert (L.train_to_label_ids(L.label_ids_to_train(L.TRAIN_TO_ID)) == L.TRAIN_TO_ID).all()


SYNTHIA_README = {  # SYNTHIA-RAND-CITYSCAPES README: id -> class; None = not a Cityscapes class
    0: None, 1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation", 7: "pole",
    8: "car", 9: "traffic sign", 10: "person", 11: "bicycle", 12: "motorcycle", 13: None, 14: None,
    15: "traffic light", 16: "terrain", 17: "rider", 18: "truck", 19: "bus", 20: "train", 21: "wall", 22: None,
}


def test_synthia_ids_map_to_the_named_classes():
    raw = np.arange(23, dtype=np.uint16)
    out = L.synthia_to_train(raw)
    for sid, name in SYNTHIA_README.items():
        assert out[sid] == (255 if name is None else L.class_index(name)), sid


def test_synthia_id_is_read_from_the_first_file_channel():
    # decoded PNG in file (RGB) order: channel 0 = class id (what cv2 returns last), channel 1 = instance
    raw = np.zeros((2, 3, 3), np.uint16)
    raw[..., 0] = [[3, 4, 2], [21, 1, 8]]
    raw[..., 1] = 4000  # instance ids would be out of the table if read by mistake
    out = L.synthia_to_train(raw)
    assert out.tolist() == [[0, 1, 2], [3, 10, 13]]


def test_subsets():
    names16 = [L.CLASS_NAMES[i] for i in L.SUBSET_16]
    names13 = [L.CLASS_NAMES[i] for i in L.SUBSET_13]
    assert len(names16) == 16 and not {"terrain", "truck", "train"} & set(names16)
    assert len(names13) == 13 and not {"wall", "fence", "pole"} & set(names13)
    lut = L.subset_lut(16)
    assert lut[L.class_index("terrain")] == 255 and lut[L.class_index("bicycle")] == 15 and lut[255] == 255


def test_colourise_matches_the_cityscapes_palette():
    lab = np.array([[0, 10, 255], [13, 18, 11]], np.uint8)
    rgb = L.colourise(lab)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for (r, c), v in np.ndenumerate(lab):
        want = (0, 0, 0) if v == 255 else trainId2label[int(v)].color
        assert tuple(rgb[r, c]) == want
    assert (L.colourise(torch.from_numpy(lab.astype(np.int64))) == rgb).all()
    with pytest.raises(ValueError, match="19"):
        L.colourise(np.array([19]))


def test_class_index_names_valid_classes():
    assert L.class_index("car") == 13
    with pytest.raises(ValueError, match="road, sidewalk"):
        L.class_index("lorry")
