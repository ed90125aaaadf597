-- Pruning deletes rotated refresh tokens by age: find them without scanning live ones.
create index refresh_tokens_rotated_idx on refresh_tokens (rotated_at) where rotated_at is not null;
