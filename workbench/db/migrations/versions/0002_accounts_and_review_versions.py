"""user accounts; review versions, second reads and adjudication

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # The batch rebuild of `review` copies rows that may reference each other: check the
        # foreign keys at commit, not row by row (foreign_keys cannot change in a transaction).
        op.execute("PRAGMA defer_foreign_keys=ON")
    op.create_table(
        "user_account",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    with op.batch_alter_table("review", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="read", nullable=False)
        )
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("supersedes_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("confidence", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("reason", sa.String(length=1024), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("seconds_spent", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("corrected_labels", sa.JSON(), nullable=True))
        batch_op.create_foreign_key("fk_review_supersedes", "review", ["supersedes_id"], ["id"])

    # Reviews written before versions existed: a reader's later rows on the same prediction
    # become their next versions, each superseding the one before (nothing is dropped).
    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT id, prediction_id, reviewer FROM review ORDER BY id")
    ).fetchall()
    last: dict[tuple[int, str], tuple[int, int]] = {}
    for rid, pid, reviewer in rows:
        prev = last.get((pid, reviewer))
        if prev is not None:
            conn.execute(
                sa.text("UPDATE review SET version = :v, supersedes_id = :s WHERE id = :i"),
                {"v": prev[1] + 1, "s": prev[0], "i": rid},
            )
        last[(pid, reviewer)] = (rid, prev[1] + 1 if prev else 1)

    op.create_index(
        "uq_review_version", "review", ["prediction_id", "reviewer", "kind", "version"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_review_version", table_name="review")
    with op.batch_alter_table("review", schema=None) as batch_op:
        batch_op.drop_constraint("fk_review_supersedes", type_="foreignkey")
        for column in (
            "corrected_labels",
            "seconds_spent",
            "reason",
            "confidence",
            "supersedes_id",
            "version",
            "kind",
        ):
            batch_op.drop_column(column)
    op.drop_table("user_account")
