"""quarantine limits: SHA-256 of each refused payload, refusals counted per sender and day

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "quarantine_tally",
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("sender", sa.String(length=64), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("kept", sa.BigInteger(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("city", "sender", "day", name=op.f("pk_quarantine_tally")),
    )


def downgrade() -> None:
    op.drop_table("quarantine_tally")
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.drop_column("sha256")
