"""The label table: one definition of what each output value means (name, colour, terminology).

Used by the trainer (what to learn), the model package (what the network predicts), the ``.seg.nrrd``
writer and the Slicer module (segment names, colours and SNOMED-CT terminology).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Code(BaseModel):
    """One coded concept (DICOM style triplet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: str = Field("SCT", description="coding scheme designator, e.g. SCT for SNOMED-CT")
    code: str
    meaning: str


ANATOMICAL_STRUCTURE = Code(scheme="SCT", code="123037004", meaning="Anatomical Structure")


class Terminology(BaseModel):
    """Segmentation category and type as Slicer's terminology module and DICOM SEG use them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    category: Code = ANATOMICAL_STRUCTURE
    type: Code
    type_modifier: Code | None = None
    anatomic_region: Code | None = None

    def to_slicer_string(self) -> str:
        """Slicer's serialised terminology entry (``SegmentN_Terminology`` in ``.seg.nrrd``).

        Format: ``context~category~type~typeModifier~anatomicContext~region~regionModifier`` where each
        coded item is ``scheme^code^meaning`` (empty as ``^^``).
        """

        def c(code: Code | None) -> str:
            return f"{code.scheme}^{code.code}^{code.meaning}" if code else "^^"

        return "~".join(
            [
                "Segmentation category and type - 3D Slicer General Anatomy list",
                c(self.category),
                c(self.type),
                c(self.type_modifier),
                "Anatomic codes - DICOM master list",
                c(self.anatomic_region),
                "^^",
            ]
        )


class Label(BaseModel):
    """One foreground label value of a model's output."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1)
    color: tuple[float, float, float] = Field(description="RGB in 0..1")
    terminology: Terminology

    @field_validator("color")
    @classmethod
    def _color_range(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"colour components must be in 0..1, got {v}")
        return v


class LabelTable(BaseModel):
    """Foreground labels of a model (background 0 is implicit). Values must be 1..N, consecutive,
    because they are the network's output channels."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    labels: tuple[Label, ...]

    @model_validator(mode="after")
    def _consecutive(self) -> "LabelTable":
        values = [lab.value for lab in self.labels]
        if values != list(range(1, len(values) + 1)):
            raise ValueError(f"label values must be 1..N in order, got {values}")
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")
        return self

    @property
    def num_classes(self) -> int:
        """Network output channels, background included."""
        return len(self.labels) + 1

    def by_value(self, value: int) -> Label:
        for lab in self.labels:
            if lab.value == value:
                return lab
        raise KeyError(value)

    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]


def _sct(code: str, meaning: str) -> Code:
    return Code(scheme="SCT", code=code, meaning=meaning)


#: Known structures of the bundled datasets: nnU-Net label name → (display name, colour, terminology).
#: Colours follow Slicer's GenericAnatomyColors where it has the structure.
KNOWN_STRUCTURES: dict[str, Label] = {
    "liver": Label(value=1, name="liver", color=(221 / 255, 130 / 255, 101 / 255),
                   terminology=Terminology(type=_sct("10200004", "Liver"))),
    "right_kidney": Label(value=1, name="right kidney", color=(185 / 255, 102 / 255, 83 / 255),
                          terminology=Terminology(type=_sct("64033007", "Kidney"),
                                                  type_modifier=_sct("24028007", "Right"))),
    "left_kidney": Label(value=1, name="left kidney", color=(185 / 255, 102 / 255, 83 / 255),
                         terminology=Terminology(type=_sct("64033007", "Kidney"),
                                                 type_modifier=_sct("7771000", "Left"))),
    "spleen": Label(value=1, name="spleen", color=(157 / 255, 108 / 255, 162 / 255),
                    terminology=Terminology(type=_sct("78961009", "Spleen"))),
    "lv_myocardium": Label(value=1, name="left ventricle myocardium", color=(206 / 255, 110 / 255, 84 / 255),
                           # SCT 87878005 is the left ventricle itself (DICOM CID 7152), not its muscle:
                           # the myocardium is coded as Myocardium in the region Left Ventricle.
                           terminology=Terminology(type=_sct("74281007", "Myocardium"),
                                                   anatomic_region=_sct("87878005", "Left Ventricle"))),
    # Blood pools: the ventricle codes as DICOM CID 7152 and Slicer's General Anatomy list give them
    # (no verified SNOMED-CT "cavity" modifier exists in either list, so none is invented here).
    # GenericAnatomyColors gives the LV blood pool almost the myocardium's colour (216,101,79 vs
    # 206,110,84); the two touch everywhere, so an annotator could not tell them apart: yellow instead.
    "lv_blood_pool": Label(value=1, name="left ventricle blood pool", color=(244 / 255, 214 / 255, 49 / 255),
                           terminology=Terminology(type=_sct("87878005", "Left Ventricle"))),
    "rv_blood_pool": Label(value=1, name="right ventricle blood pool", color=(111 / 255, 184 / 255, 210 / 255),
                           terminology=Terminology(type=_sct("53085002", "Right Ventricle"))),
}


def label_table_from_dataset_labels(labels: dict[str, int]) -> LabelTable:
    """Build the label table from an nnU-Net ``dataset.json`` ``labels`` mapping (name → value).

    Known structures get curated names, colours and SNOMED-CT codes; unknown ones raise, because a
    model without terminology would produce unnamed, uncoded segments in Slicer.
    """
    out = []
    for key, value in sorted(labels.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        if key not in KNOWN_STRUCTURES:
            raise ValueError(
                f"label '{key}' has no curated terminology; add it to KNOWN_STRUCTURES in labels.py "
                f"(name, colour, SNOMED-CT code)"
            )
        out.append(KNOWN_STRUCTURES[key].model_copy(update={"value": value}))
    return LabelTable(labels=tuple(out))
