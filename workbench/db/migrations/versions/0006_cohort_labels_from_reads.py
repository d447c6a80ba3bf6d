"""cohort: labels per member with their source, and how the cohort was made

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: members of cohorts made before this revision keep the catalog's labels.
    with op.batch_alter_table("cohort_member") as batch_op:
        batch_op.add_column(sa.Column("label", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("label_source", sa.String(length=16), nullable=True))
    with op.batch_alter_table("cohort") as batch_op:
        batch_op.add_column(sa.Column("provenance", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cohort") as batch_op:
        batch_op.drop_column("provenance")
    with op.batch_alter_table("cohort_member") as batch_op:
        batch_op.drop_column("label_source")
        batch_op.drop_column("label")
