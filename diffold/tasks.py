"""Task registry: everything that differs between RNA and protein lives here, not in the loop."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD = 0  # token 0 is padding in every vocabulary


@dataclass(frozen=True)
class Task:
    name: str                      # "rna" | "protein"
    kind: str                      # molecule kind the parser reports for chains of this task
    alphabet: str                  # residue letters; the last one is the unknown letter
    default_atoms: tuple[str, ...]  # representative atoms per residue
    atom_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # named sets
    lddt_radius: float = 15.0      # lDDT inclusion radius (AF3: 30 A for nucleic acids)
    tm_molecule: str = "protein"   # which d0 formula TM-score uses
    bond_length: float = 3.8       # consecutive representative-atom distance (A), bond loss
    bend_angle: float = 99.0       # median angle x_{i-1}, x_i, x_{i+1} (deg; data/examples), random-walk baseline

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1  # + PAD

    @property
    def unknown(self) -> str:
        return self.alphabet[-1]

    def tokenize(self, sequence: str) -> torch.Tensor:
        """Sequence -> [L] long tokens (1..len(alphabet)); unknown letters map to the unknown token."""
        index = {c: i + 1 for i, c in enumerate(self.alphabet)}
        unk = index[self.unknown]
        return torch.tensor([index.get(c, unk) for c in sequence.upper()], dtype=torch.long)

    def resolve_atoms(self, spec: str | None) -> tuple[str, ...]:
        """None -> default atoms; a named set ('backbone'); or a comma list ("P,C4',N1/N9")."""
        if spec is None or spec == "default":
            return self.default_atoms
        if spec in self.atom_sets:
            return self.atom_sets[spec]
        atoms = tuple(a.strip() for a in spec.split(",") if a.strip())
        if not atoms:
            raise ValueError(f"data.atoms={spec!r} names no atom; use e.g. \"C4'\" or one of {sorted(self.atom_sets)}")
        return atoms


TASKS: dict[str, Task] = {
    "rna": Task(
        name="rna",
        kind="rna",
        alphabet="ACGUN",
        default_atoms=("C4'",),
        atom_sets={"c4": ("C4'",), "c3": ("C3'",), "c1": ("C1'",), "p_c4_n": ("P", "C4'", "N1/N9")},
        lddt_radius=30.0,
        tm_molecule="rna",
        bond_length=6.0,
        bend_angle=143.0,
    ),
    "protein": Task(
        name="protein",
        kind="protein",
        alphabet="ACDEFGHIKLMNPQRSTVWYX",
        default_atoms=("CA",),
        atom_sets={"ca": ("CA",), "backbone": ("N", "CA", "C", "O")},
        lddt_radius=15.0,
        tm_molecule="protein",
        bond_length=3.8,
        bend_angle=99.0,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose from {sorted(TASKS)} (adding one = one entry in TASKS)")
    return TASKS[name]
