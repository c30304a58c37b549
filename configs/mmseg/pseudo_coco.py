# mmsegmentation 1.x dataset config: the pseudo masks of a COCO job (`pseudolabel run --config
# coco`, then `pseudolabel export --with-images`) as an 81-class training set: 0 background, 1..80 the
# classes of `--config coco` (COCO category-id order), 255 ignored. Pipelines and loaders are
# mmseg's `pascal_voc12` ones; there is no validation set here (the base's is VOC): add one with
# COCO ground truth in the same values.
# Edit one line: pseudo_root, the -o/--output folder of the export.
_base_ = ['mmseg::_base_/datasets/pascal_voc12.py']

pseudo_root = 'pseudo-coco/'  # the export: JPEGImages/, SegmentationClassPseudo/, ImageSets/
split = 'train_aug'          # pseudolabel export --split (default train_aug)

classes = ('background',
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus',
    'train', 'truck', 'boat', 'traffic_light', 'fire_hydrant', 'stop_sign',
    'parking_meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe',
    'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports_ball', 'kite', 'baseball_bat', 'baseball_glove',
    'skateboard', 'surfboard', 'tennis_racket', 'bottle', 'wine_glass', 'cup',
    'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot_dog', 'pizza',
    'donut', 'cake', 'chair', 'couch', 'potted_plant', 'bed',
    'dining_table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell_phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy_bear',
    'hair_drier', 'toothbrush')

train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='BaseSegDataset',
        metainfo=dict(classes=classes),
        data_root=pseudo_root,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassPseudo'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        ann_file=f'ImageSets/Segmentation/{split}.txt',
        pipeline={{_base_.train_pipeline}}))
val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = None
test_evaluator = None
test_cfg = None
