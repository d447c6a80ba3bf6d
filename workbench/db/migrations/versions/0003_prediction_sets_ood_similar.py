"""prediction: conformal set, out-of-distribution flag, similar prior cases

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns: SQLite adds them without rebuilding the table; predictions made before
    # this revision (or by a bundle without these parts) simply have none.
    with op.batch_alter_table("prediction") as batch_op:
        batch_op.add_column(sa.Column("prediction_set", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("ood_flag", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("ood", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("similar", sa.JSON(), nullable=True))
        batch_op.create_index("ix_prediction_ood_flag", ["ood_flag"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("prediction") as batch_op:
        batch_op.drop_index("ix_prediction_ood_flag")
        batch_op.drop_column("similar")
        batch_op.drop_column("ood")
        batch_op.drop_column("ood_flag")
        batch_op.drop_column("prediction_set")
