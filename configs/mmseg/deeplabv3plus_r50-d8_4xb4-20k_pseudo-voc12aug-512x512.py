# DeepLabV3+ R50-D8 (mmsegmentation 1.x, 4 GPUs x 4 images, 20k iterations, 512 x 512 crops)
# trained on the pseudo masks of `pseudolabel export --with-images`, validated on VOC val.
# Edit one line: pseudo_root, the -o/--output folder of the export. Then, from an mmsegmentation
# checkout: tools/dist_train.sh <this file> 4
_base_ = ['mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-20k_voc12aug-512x512.py']

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
