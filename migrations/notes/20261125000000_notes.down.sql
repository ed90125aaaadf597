drop table topics;
drop table chapters;
drop table notes;
drop extension if exists btree_gin;
