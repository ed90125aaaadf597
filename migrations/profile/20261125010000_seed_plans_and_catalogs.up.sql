-- The default free plan every user starts on, a paid tier, and a few catalog entries so a
-- fresh deployment has something to show. Fixed ids, so the down migration removes exactly
-- these rows (and only while nothing refers to them).
insert into plans (id, name, description, features, ai_daily_limit, is_paid, is_default, sort_order)
values
    ('free', 'Free', 'Notes with a few AI generations a day.', '{ai_generation}', 3, false, true, 0),
    ('pro', 'Pro', 'More AI generations and custom frames.', '{ai_generation,custom_frames}', 50, true, false, 10);

insert into profession_types (id, name, sort_order)
values
    ('01937a4c-0000-7000-8000-000000000001', 'Teacher', 10),
    ('01937a4c-0000-7000-8000-000000000002', 'Student', 20),
    ('01937a4c-0000-7000-8000-000000000003', 'Designer', 30),
    ('01937a4c-0000-7000-8000-000000000004', 'Engineer', 40);

insert into business_categories (id, name, sort_order)
values
    ('01937a4c-0000-7000-8000-000000000101', 'Education', 10),
    ('01937a4c-0000-7000-8000-000000000102', 'Retail', 20),
    ('01937a4c-0000-7000-8000-000000000103', 'Hospitality', 30),
    ('01937a4c-0000-7000-8000-000000000104', 'Health', 40);
