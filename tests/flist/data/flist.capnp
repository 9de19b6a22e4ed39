# The v1 flist schema (0-flist format/flist.capnp), written from its documented field list;
# used only to build test flists with `capnp encode`.
@0xe0cbbd1b3e5c9a21;

struct Dir {
  name @0 :Text;
  location @1 :Text;
  contents @2 :List(Inode);
  parent @3 :Text;
  size @4 :UInt64;
  aclkey @5 :Text;
  modificationTime @6 :UInt32;
  creationTime @7 :UInt32;
}

struct Inode {
  name @0 :Text;
  size @1 :UInt64;
  attributes :union {
    dir @2 :SubDir;
    file @3 :File;
    link @4 :Link;
    special @5 :Special;
  }
  aclkey @6 :Text;
  modificationTime @7 :UInt32;
  creationTime @8 :UInt32;
}

struct SubDir {
  key @0 :Text;
}

struct Link {
  target @0 :Text;
}

struct File {
  blockSize @0 :UInt16;
  blocks @1 :List(FileBlock);
}

struct FileBlock {
  hash @0 :Data;
  key @1 :Data;
}

struct Special {
  type @0 :Type;
  data @1 :Data;
  enum Type {
    socket @0;
    block @1;
    chardev @2;
    fifopipe @3;
    unknown @4;
  }
}

struct ACI {
  uname @0 :Text;
  gname @1 :Text;
  mode @2 :UInt16;
  rights @3 :List(Right);
  struct Right {
    right @0 :Text;
    usergroupid @1 :UInt16;
  }
  id @4 :UInt32;
  uid @5 :Int64 = -1;
  gid @6 :Int64 = -1;
}
