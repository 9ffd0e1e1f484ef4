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

# Numbers other codebases and papers publish for built-in configs that are not seed rows:
# config name -> (mIoU in %, what it is and where it is published, the column of incseg's tables it
# is to be read against: all / with_bg / old, incseg.published). ``incseg configs`` shows them.
PUBLISHED: dict[str, tuple[float, str, str]] = {
    # cssegmentation's ILT model zoo (docs/modelzoo/ilt/README.md:33-36 at c125175), every class
    # with background, as the seed table.
    "seed/ilt_r101iabnd16_aspp_512x512_vocaug15-1_disjoint": (
        8.6,
        "cssegmentation's zoo, with background",
        "with_bg",
    ),
    "seed/ilt_r101iabnd16_aspp_512x512_vocaug15-1_overlap": (
        9.3,
        "cssegmentation's zoo, with background",
        "with_bg",
    ),
    "seed/ilt_r101iabnd16_aspp_512x512_vocaug10-1_disjoint": (
        5.4,
        "cssegmentation's zoo, with background",
        "with_bg",
    ),
    "seed/ilt_r101iabnd16_aspp_512x512_vocaug10-1_overlap": (
        5.9,
        "cssegmentation's zoo, with background",
        "with_bg",
    ),
    # UCD paper, Table 1 (ygjwd12345/UCD image/result1.png), MiB+UCD, the "all" column.
    "voc/19-1-disjoint-mib+ucd": (72.0, "UCD paper Table 1, all", "all"),
    "voc/19-1-overlap-mib+ucd": (71.7, "UCD paper Table 1, all", "all"),
    "voc/15-5-disjoint-mib+ucd": (66.3, "UCD paper Table 1, all", "all"),
    "voc/15-5-overlap-mib+ucd": (71.5, "UCD paper Table 1, all", "all"),
    "voc/15-1-disjoint-mib+ucd": (43.5, "UCD paper Table 1, all", "all"),
    "voc/15-1-overlap-mib+ucd": (42.2, "UCD paper Table 1, all", "all"),
    # REMINDER README (images/results.png), the "all" column (VOC overlapped; ADE20K). REMINDER and
    # RCIL are built on PLOP's code, whose mean IoU counts the background, and their tables list
    # PLOP's 15-5 overlapped number as PLOP's Table 1 gives it with background (70.1 = 70.09,
    # docs/reproduction.md): their "all" is incseg's with_bg.
    "voc/19-1-overlap-reminder": (74.38, "REMINDER README, all, with background", "with_bg"),
    "voc/15-5-overlap-reminder": (70.07, "REMINDER README, all, with background", "with_bg"),
    "voc/15-1-overlap-reminder": (58.52, "REMINDER README, all, with background", "with_bg"),
    "ade/100-50-reminder": (34.14, "REMINDER README, all, with background", "with_bg"),
    "ade/100-10-reminder": (33.11, "REMINDER README, all, with background", "with_bg"),
    # RCIL README.md:75-92 (final-step mIoU over all classes).
    "voc/15-1-disjoint-rcil": (54.7, "RCIL README, all, with background", "with_bg"),
    "voc/15-1-overlap-rcil": (59.4, "RCIL README, all, with background", "with_bg"),
    "voc/10-1-disjoint-rcil": (18.2, "RCIL README, all, with background", "with_bg"),
    "voc/10-1-overlap-rcil": (34.3, "RCIL README, all, with background", "with_bg"),
    "ade/100-50-rcil": (34.5, "RCIL README, all, with background", "with_bg"),
    "ade/100-10-rcil": (32.1, "RCIL README, all, with background", "with_bg"),
    "ade/100-5-rcil": (29.6, "RCIL README, all, with background", "with_bg"),
    # SSUL README.md:31-45 (mIoU over every class with background, the final step).
    "voc/15-5-overlap-ssul": (71.22, "SSUL README, with background", "with_bg"),
    "voc/15-5-overlap-ssul-m": (73.02, "SSUL README, with background", "with_bg"),
    "voc/15-1-overlap-ssul": (67.61, "SSUL README, with background", "with_bg"),
    "voc/15-1-overlap-ssul-m": (71.37, "SSUL README, with background", "with_bg"),
    "voc/10-1-overlap-ssul": (59.25, "SSUL README, with background", "with_bg"),
    "voc/10-1-overlap-ssul-m": (64.12, "SSUL README, with background", "with_bg"),
    "ade/100-50-ssul": (33.58, "SSUL README, with background", "with_bg"),
    "ade/100-50-ssul-m": (34.37, "SSUL README, with background", "with_bg"),
    "ade/100-10-ssul": (33.1, "SSUL README, with background", "with_bg"),
    "ade/100-10-ssul-m": (34.46, "SSUL README, with background", "with_bg"),
    "ade/100-5-ssul": (32.48, "SSUL README, with background", "with_bg"),
    "ade/100-5-ssul-m": (34.56, "SSUL README, with background", "with_bg"),
    # DKD README.md:101-119 (mIoU over every class with background, the final step).
    "voc/15-5-overlap-dkd": (73.95, "DKD README, with background", "with_bg"),
    "voc/15-5-overlap-dkd-m": (74.84, "DKD README, with background", "with_bg"),
    "voc/15-1-overlap-dkd": (70.5, "DKD README, with background", "with_bg"),
    "voc/15-1-overlap-dkd-m": (72.95, "DKD README, with background", "with_bg"),
    "voc/10-1-overlap-dkd": (60.43, "DKD README, with background", "with_bg"),
    "voc/10-1-overlap-dkd-m": (66.2, "DKD README, with background", "with_bg"),
    "voc/15-5-disjoint-dkd": (72.21, "DKD README, with background", "with_bg"),
    "voc/15-5-disjoint-dkd-m": (72.53, "DKD README, with background", "with_bg"),
    "voc/15-1-disjoint-dkd": (68.48, "DKD README, with background", "with_bg"),
    "voc/15-1-disjoint-dkd-m": (70.78, "DKD README, with background", "with_bg"),
    "ade/100-50-dkd": (35.55, "DKD README, with background", "with_bg"),
    "ade/100-50-dkd-m": (35.58, "DKD README, with background", "with_bg"),
    "ade/100-10-dkd": (34.53, "DKD README, with background", "with_bg"),
    "ade/100-10-dkd-m": (34.83, "DKD README, with background", "with_bg"),
    # STAR README.md:116-136 (mIoU over every class with background, the final step).
    "voc/15-5-overlap-star": (74.86, "STAR README, with background", "with_bg"),
    "voc/15-5-overlap-star-m": (75.8, "STAR README, with background", "with_bg"),
    "voc/15-1-overlap-star": (72.9, "STAR README, with background", "with_bg"),
    "voc/15-1-overlap-star-m": (74.03, "STAR README, with background", "with_bg"),
    "voc/10-1-overlap-star": (64.86, "STAR README, with background", "with_bg"),
    "voc/10-1-overlap-star-m": (66.6, "STAR README, with background", "with_bg"),
    "voc/15-5-disjoint-star": (73.48, "STAR README, with background", "with_bg"),
    "voc/15-5-disjoint-star-m": (73.79, "STAR README, with background", "with_bg"),
    "voc/15-1-disjoint-star": (70.77, "STAR README, with background", "with_bg"),
    "voc/15-1-disjoint-star-m": (71.18, "STAR README, with background", "with_bg"),
    "ade/100-50-star": (36.39, "STAR README, with background", "with_bg"),
    "ade/100-10-star": (34.91, "STAR README, with background", "with_bg"),
    # CoMFormer: its README has no numbers; the paper's old-class mIoU (classes 1-100, 1-50 for
    # 50-50) after the last step, as the benchmark listing of wizwand.com gives it (the page of
    # arXiv 2211.13999). Old classes only: its "all" is not listed there.
    "ade/100-50-comformer": (44.7, "CoMFormer paper, old classes 1-100", "old"),
    "ade/100-10-comformer": (40.6, "CoMFormer paper, old classes 1-100", "old"),
    "ade/100-5-comformer": (39.5, "CoMFormer paper, old classes 1-100", "old"),
    "ade/50-50-comformer": (49.2, "CoMFormer paper, old classes 1-50", "old"),
    # BalConpas-R (replay, 300 images): jinpeng0528/BalConpas README.md:113-115 (model zoo, CSS),
    # mIoU after the last step over every seen class, ADE20K's 0 ignored (continual/evaluator.py)
    "ade/100-50-balconpas-m": (44.01, "BalConpas README, classes 1-150 (all)", "all"),
    "ade/100-10-balconpas-m": (40.43, "BalConpas README, classes 1-150 (all)", "all"),
    "ade/100-5-balconpas-m": (36.79, "BalConpas README, classes 1-150 (all)", "all"),
    "ade/50-50-balconpas-m": (41.33, "BalConpas README, classes 1-150 (all)", "all"),
    # SimCIS paper, Table 3 (assets/CVPR_2025_SimCIS.pdf of SooLab/SimCIS 28bc91e; its README
    # gives weights, not numbers): the "all" column, classes 1-150, ADE20K's 0 void.
    "ade/100-50-simcis": (48.6, "SimCIS paper Table 3, classes 1-150 (all)", "all"),
    "ade/100-10-simcis": (42.3, "SimCIS paper Table 3, classes 1-150 (all)", "all"),
    "ade/100-5-simcis": (38.7, "SimCIS paper Table 3, classes 1-150 (all)", "all"),
}
