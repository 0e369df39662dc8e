"""hotlist versions: the version that added each hotlisted card, when each version was made and first published,
and the version and chunk count of the last full snapshot published

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08

Existing lists: their cards are tagged with the city's current version, and that version gets its row, created
when its newest card was added, ``published`` left NULL. Before 0003 only the issuer's own terminals followed its
list, so no other city's terminals could have known it: liability counts from the first network-wide publish
(the next ``clearing serve`` or ``hotlist add`` publishes a snapshot and sets it). Earlier versions get no row:
nothing says which cards they added.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hotlist_version",
        sa.Column("city", sa.String(length=4), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("published", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("city", "version", name=op.f("pk_hotlist_version")),
    )
    with op.batch_alter_table("hotlist_card", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("city_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("snapshot_version", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("snapshot_chunks", sa.Integer(), server_default="0", nullable=False))
    op.execute(
        "UPDATE hotlist_card SET version ="
        " (SELECT s.hotlist_version FROM city_state s WHERE s.city = hotlist_card.city)"
        " WHERE EXISTS (SELECT 1 FROM city_state s WHERE s.city = hotlist_card.city)"
    )
    op.execute(
        sa.text(
            "INSERT INTO hotlist_version (city, version, created, published)"
            " SELECT s.city, s.hotlist_version,"
            " COALESCE((SELECT MAX(h.added) FROM hotlist_card h WHERE h.city = s.city), :now), NULL"
            " FROM city_state s WHERE s.hotlist_version > 0"
        ).bindparams(now=time.time())
    )


def downgrade() -> None:
    with op.batch_alter_table("city_state", schema=None) as batch_op:
        batch_op.drop_column("snapshot_chunks")
        batch_op.drop_column("snapshot_version")
    with op.batch_alter_table("hotlist_card", schema=None) as batch_op:
        batch_op.drop_column("version")
    op.drop_table("hotlist_version")
