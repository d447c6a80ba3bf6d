"""prediction: the calibration map applied (a site's own or the global one)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: SQLite adds the column without rebuilding the table; predictions made before
    # this revision do not say which map calibrated them (the bundle's global one).
    with op.batch_alter_table("prediction") as batch_op:
        batch_op.add_column(sa.Column("calibration_map", sa.String(length=160), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prediction") as batch_op:
        batch_op.drop_column("calibration_map")
