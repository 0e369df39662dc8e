"""initial clearing schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "city_state",
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("hotlist_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("city", name=op.f("pk_city_state")),
    )
    op.create_table(
        "flagged_card",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("issuer", sa.String(length=4), nullable=False),
        sa.Column("card", sa.String(length=20), nullable=False),
        sa.Column("record_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flagged_card")),
        sa.UniqueConstraint(
            "city", "issuer", "card", "record_id", name=op.f("uq_flagged_card_city_issuer_card_record_id")
        ),
    )
    op.create_table(
        "hotlist_card",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("card", sa.String(length=20), nullable=False),
        sa.Column("added", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hotlist_card")),
        sa.UniqueConstraint("city", "card", name=op.f("uq_hotlist_card_city_card")),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("issuer", sa.String(length=4), nullable=False),
        sa.Column("card", sa.String(length=20), nullable=False),
        sa.Column("kind", sa.String(length=12), nullable=False),
        sa.Column("card_counter", sa.Integer(), nullable=False),
        sa.Column("tech", sa.String(length=3), nullable=False),
        sa.Column("acquirer", sa.String(length=4), nullable=False),
        sa.Column("terminal", sa.String(length=12), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("terminal_seq", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("balance_before", sa.Integer(), nullable=False),
        sa.Column("balance_after", sa.Integer(), nullable=False),
        sa.Column("time", sa.String(length=40), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("tac", sa.String(length=8), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("forward", sa.String(length=8), nullable=True),
        sa.Column("forward_reason", sa.Text(), nullable=True),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("received", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger")),
        sa.UniqueConstraint(
            "city", "issuer", "card", "kind", "card_counter", name=op.f("uq_ledger_city_issuer_card_kind_card_counter")
        ),
    )
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_city_day"), ["city", "day"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledger_city_forward"), ["city", "forward"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledger_city_terminal_seq"), ["city", "terminal", "seq"], unique=False)

    op.create_table(
        "quarantine",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("terminal", sa.Text(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("record_id", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("received", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
    )
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_quarantine_city_terminal_seq"), ["city", "terminal", "seq"], unique=False)

    op.create_table(
        "terminal_progress",
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("terminal", sa.String(length=12), nullable=False),
        sa.Column("acked_through", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("city", "terminal", name=op.f("pk_terminal_progress")),
    )


def downgrade() -> None:
    op.drop_table("terminal_progress")
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quarantine_city_terminal_seq"))

    op.drop_table("quarantine")
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_city_terminal_seq"))
        batch_op.drop_index(batch_op.f("ix_ledger_city_forward"))
        batch_op.drop_index(batch_op.f("ix_ledger_city_day"))

    op.drop_table("ledger")
    op.drop_table("hotlist_card")
    op.drop_table("flagged_card")
    op.drop_table("city_state")
