#!/usr/bin/env python3
"""What does a write-heavy neighbour do to a small fdatasync on this disk?

A probe overwrites 4 KiB of a 64 MiB file and fdatasyncs it, in a loop (as the
Raft log's group commit does), for SECONDS; beside it a writer writes 64 MiB
files in 1 MiB writes, each followed by posix_fadvise(DONTNEED) to start its
writeback (as cairn-lsm's table writer does), an fdatasync per file, then
deletes it, paced at each of RATES MiB/s (-1: no writer; 0: unpaced). Prints
the probe's fsync latency quantiles per rate, ROUNDS times in rotation.

Usage: fsync-probe.py DIR SECONDS RATES ROUNDS
e.g.   fsync-probe.py /tmp/probe 15 -1,32,64,128,256,0 2
Used 2026-12-07, docs/benchmarks.md, "Compaction threads at a lower CPU priority".
"""
import os, sys, threading, time

D=sys.argv[1]; T=float(sys.argv[2]); rates=[int(x) for x in sys.argv[3].split(',')]; rounds=int(sys.argv[4])
A=os.path.join(D,'probe'); fd=os.open(A,os.O_RDWR|os.O_CREAT,0o644)
os.pwrite(fd,b'\0'*(64<<20),0); os.fsync(fd)
def writer(rate, stop):
    buf=os.urandom(1<<20); n=0; t0=time.monotonic(); i=0
    while not stop.is_set():
        p=os.path.join(D,f'tbl{i}'); f=os.open(p,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o644); off=0
        while off < (64<<20) and not stop.is_set():
            os.pwrite(f,buf,off); os.posix_fadvise(f,off,1<<20,os.POSIX_FADV_DONTNEED); off+=1<<20; n+=1<<20
            if rate>0:
                due=t0+n/(rate<<20); d=due-time.monotonic()
                if d>0: time.sleep(d)
        os.fdatasync(f); os.close(f); os.unlink(p); i+=1
for r in range(rounds):
    for rate in rates:
        stop=threading.Event(); th=None
        if rate>=0:
            th=threading.Thread(target=writer,args=(rate,stop)); th.start()
        time.sleep(1)
        lat=[]; off=0; end=time.monotonic()+T; blk=os.urandom(4096)
        while time.monotonic()<end:
            s=time.monotonic(); os.pwrite(fd,blk,off); os.fdatasync(fd); lat.append(time.monotonic()-s); off=(off+4096)%(64<<20)
        stop.set()
        if th: th.join()
        lat.sort(); q=lambda p: lat[min(len(lat)-1,int(p*len(lat)))]*1000
        print(f"round {r} rate {'none' if rate<0 else ('unpaced' if rate==0 else str(rate)+' MiB/s')}: n={len(lat)} p50={q(.5):.2f} p99={q(.99):.2f} p999={q(.999):.2f} max={lat[-1]*1000:.1f} ms", flush=True)
os.close(fd); os.unlink(A)
