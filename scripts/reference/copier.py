# Issue 23's reference (scripts/capture-reference): test_decoding lines from
# pg_recvlogical on stdin, COPYed into a log table in batches (5 ms
# linger), over one connection.
import sys, os, select, io, time, psycopg2
conn = psycopg2.connect(host='127.0.0.1', port=int(os.environ.get('PGPORT', '5499')), user='postgres', dbname='postgres')
conn.autocommit = False
cur = conn.cursor()
cur.execute("CREATE TABLE IF NOT EXISTS reflog (id bigserial primary key, line text not null)")
conn.commit()
fd = sys.stdin.fileno()
buf = b''
batch = []
first = None
n = 0
def flush():
    global batch, first, n
    if batch:
        data = io.StringIO(''.join(l.replace('\\', '\\\\').replace('\t', '\\t') + '\n' for l in batch))
        cur.copy_expert("COPY reflog(line) FROM STDIN", data)
        conn.commit()
        n += len(batch)
    batch = []; first = None
while True:
    timeout = None if first is None else max(0, first + 0.005 - time.monotonic())
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            flush(); break
        buf += chunk
        *lines, buf = buf.split(b'\n')
        for l in lines:
            s = l.decode()
            if s.startswith('table '):
                batch.append(s)
                if first is None: first = time.monotonic()
    else:
        flush()
print(n, file=sys.stderr)
