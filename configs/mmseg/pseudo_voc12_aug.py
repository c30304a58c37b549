# mmsegmentation 1.x dataset config: the pseudo masks of `pseudolabel export --with-images` as the
# training set over mmseg's stock `pascal_voc12_aug` base (the base of every *_voc12aug model
# config), replacing its train + aug ConcatDataset; validation stays its VOC val set.
# Edit one line: pseudo_root, the -o/--output folder of the export.
_base_ = ['mmseg::_base_/datasets/pascal_voc12_aug.py']

pseudo_root = 'pseudo-voc/'  # the export: JPEGImages/, SegmentationClassPseudo/, ImageSets/
split = 'train_aug'          # pseudolabel export --split (default train_aug)

train_dataloader = dict(
    dataset=dict(
        _delete_=True,  # the base's ConcatDataset of train and aug goes
        type='PascalVOCDataset',
        data_root=pseudo_root,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassPseudo'),
        ann_file=f'ImageSets/Segmentation/{split}.txt',
        pipeline={{_base_.train_pipeline}}))
# Pixels of 255 (--ignore-below) are left out of the loss: mmseg's decode heads ignore 255.
