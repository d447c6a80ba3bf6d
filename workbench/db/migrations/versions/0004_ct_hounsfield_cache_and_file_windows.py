"""instance: Hounsfield-unit cache key and the file's own windows; series: HU volume key

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns: SQLite adds them without rebuilding the tables. Instances ingested
    # before this revision have no HU cache and no recorded windows: the viewer shows them on
    # the display scale, as before.
    with op.batch_alter_table("instance") as batch_op:
        batch_op.add_column(sa.Column("hu_cache_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("windows", sa.JSON(), nullable=True))
    with op.batch_alter_table("series") as batch_op:
        batch_op.add_column(sa.Column("hu_volume_cache_key", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch_op:
        batch_op.drop_column("hu_volume_cache_key")
    with op.batch_alter_table("instance") as batch_op:
        batch_op.drop_column("windows")
        batch_op.drop_column("hu_cache_key")
