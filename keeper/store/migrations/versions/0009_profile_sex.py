"""A profile's ``sex`` is WeChat's integer (0 unknown, 1 male, 2 female), no longer text.

keeper stored the value as it came, as text ("0", "1", and now and then " 2 " or "1.0" when
WeChat sent a string), and answered it as a string. Each stored value becomes what
:func:`keeper.core.clean.sex_code` makes of it, the rule every profile read follows from now
on: the digits 0, 1, 2 (blanks around them trimmed) their integer, blank or NULL NULL, anything
else 0. The few distinct texts are read and mapped in Python, so the rule is the code's and
not a second copy in SQL, and the rows are then rewritten by one statement.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keeper.core.clean import SEX_CODES, sex_code

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    stored = conn.execute(sa.text("SELECT DISTINCT sex FROM profiles WHERE sex IS NOT NULL"))
    codes: dict[int | None, list[str]] = {}
    for (text,) in stored:
        codes.setdefault(sex_code(text), []).append(text)
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("sex_code", sa.Integer))
    # The texts of 1, 2 and NULL are named; everything else is 0 (its list can be long).
    # NULL stays NULL.
    named = [(code, codes.get(code, [])) for code in (*SEX_CODES[1:], None)]
    whens = " ".join(f"WHEN sex IN :t{i} THEN {'NULL' if code is None else code}"
                     for i, (code, texts) in enumerate(named) if texts)
    statement = sa.text(f"UPDATE profiles SET sex_code = CASE {whens} ELSE 0 END "
                        "WHERE sex IS NOT NULL" if whens else
                        "UPDATE profiles SET sex_code = 0 WHERE sex IS NOT NULL")
    params = {f"t{i}": texts for i, (_, texts) in enumerate(named) if texts}
    statement = statement.bindparams(*(sa.bindparam(name, expanding=True) for name in params))
    conn.execute(statement, params)
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("sex")
        batch.alter_column("sex_code", new_column_name="sex", existing_type=sa.Integer)


def downgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("sex_text", sa.String(16)))
    op.execute(sa.text("UPDATE profiles SET sex_text = CAST(sex AS VARCHAR(16))"))
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("sex")
        batch.alter_column("sex_text", new_column_name="sex", existing_type=sa.String(16))
