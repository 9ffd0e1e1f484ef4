"""Built-in configs: the demo, the MiB paper's rows (``voc/``, ``ade/``) and the seed table's rows
(``seed/``, cssegmentation's MiB model zoo, written by ``tools/make_configs.py``)."""

# The seed table (cssegmentation docs/modelzoo/mib/README.md, the document incseg started from): name ->
# reported mIoU in % over every class with background (incseg's miou_with_bg), None where the
# row has no number.
SEED_MIOU: dict[str, float | None] = {
    "mib_r101iabnd16_aspp_512x512_vocaug15-5_disjoint": 66.1,
    "mib_r101iabnd16_aspp_512x512_vocaug15-5_overlap": 70.2,
    "mib_r101iabnd16_aspp_512x512_vocaug15-1_disjoint": None,
    "mib_r101iabnd16_aspp_512x512_vocaug15-1_overlap": None,
    "mib_r101iabnd16_aspp_512x512_vocaug10-1_disjoint": 9.9,
    "mib_r101iabnd16_aspp_512x512_vocaug10-1_overlap": 21.1,
    "mib_r101iabnd16_aspp_512x512_ade20k100-50_disjoint": None,
    "mib_r101iabnd16_aspp_512x512_ade20k100-50_overlap": None,
    "mib_r101iabnd16_aspp_512x512_ade20k100-10_disjoint": None,
    "mib_r101iabnd16_aspp_512x512_ade20k100-10_overlap": None,
    "mib_r101iabnd16_aspp_512x512_ade20k100-5_disjoint": None,
    "mib_r101iabnd16_aspp_512x512_ade20k100-5_overlap": None,
}

# Rows the seed table leaves empty that cssegmentation's model zoo reports today
# (SegmentationBLWX/cssegmentation at c125175, docs/modelzoo/mib/README.md:31-32), same convention.
ZOO_MIOU: dict[str, float] = {
    "mib_r101iabnd16_aspp_512x512_vocaug15-1_disjoint": 40.7,
    "mib_r101iabnd16_aspp_512x512_vocaug15-1_overlap": 34.6,
}
