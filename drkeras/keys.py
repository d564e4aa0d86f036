"""Names shared by records, pipelines, models, exports and log files.

Every part of drkeras refers to example fields and model outputs through these constants, so a
rename happens in one place and a typo fails at import time instead of silently at run time.
"""

# Fields of a parsed record (drkeras.data.records.parse_example) and of pipeline elements.
ID = "id"
DATASET = "dataset"
SPLIT = "split"
IMAGE = "image"
GRADE = "grade"
DME = "dme"
MASKS = "masks"
MASK_PRESENT = "mask_present"

# Lesion types in the fixed order of the record schema (docs/design.md section 3).
LESIONS = ("MA", "HE", "EX", "SE", "OD")
LESION_NAMES = {
    "MA": "microaneurysms",
    "HE": "haemorrhages",
    "EX": "hard exudates",
    "SE": "soft exudates",
    "OD": "optic disc",
}
NUM_LESIONS = len(LESIONS)

# International Clinical Diabetic Retinopathy scale (ICDRS); -1 marks an unknown label.
NUM_GRADES = 5
GRADE_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "PDR")
UNKNOWN = -1

# Named model outputs (functional models and exported serving signatures).
GRADE_LOGITS = "grade_logits"
GRADE_PROBS = "grade_probs"
LESION_LOGITS = "lesion_logits"
LESION_PROBS = "lesion_probs"
SEG_PROBS = "seg_probs"
ATTENTION = "attention"
PATCH_LOGITS = "patch_logits"
IMAGE_SCORE = "image_score"

# Splits used by converters and pipelines.
SPLITS = ("train", "val", "test")
