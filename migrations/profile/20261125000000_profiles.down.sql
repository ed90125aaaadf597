drop table profiles;
