"""review: whether the reader saw the model's output (labelling reads are blind by default)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("review") as batch_op:
        batch_op.add_column(sa.Column("model_visible", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("review") as batch_op:
        batch_op.drop_column("model_visible")
