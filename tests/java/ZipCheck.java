import java.io.BufferedInputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.Enumeration;
import java.util.List;
import java.util.zip.CRC32;
import java.util.zip.ZipEntry;
import java.util.zip.ZipFile;
import java.util.zip.ZipInputStream;

/**
 * Reads a ZIP archive the two ways Java programs do, and fails on anything either way rejects.
 *
 * <p>Usage: {@code java ZipCheck.java <archive.zip> <expected-entry-count>}
 *
 * <ul>
 *   <li>{@code ZipInputStream} (streaming, local headers and data descriptors): every entry is read to its
 *       end, which makes ZipInputStream check its size and CRC-32.
 *   <li>{@code ZipFile} (central directory): every entry is listed and opened through its local header
 *       offset; entries up to 16 MiB are read whole and their CRC-32 compared with the directory's.
 * </ul>
 *
 * Both must see the expected number of entries with the same names, sizes and CRCs, in the same order.
 * Exit status: 0 when the archive passes, 1 (with every failure on stderr) otherwise, 64 on bad usage.
 */
public final class ZipCheck {
    private static final int FULL_READ_LIMIT = 16 * 1024 * 1024;

    private record Seen(String name, long size, long crc) {}

    private ZipCheck() {}

    public static void main(String[] args) {
        if (args.length != 2) {
            System.err.println("usage: java ZipCheck.java <archive.zip> <expected-entry-count>");
            System.exit(64);
        }
        File archive = new File(args[0]);
        long expected = Long.parseLong(args[1]);
        List<String> failures = new ArrayList<>();
        List<Seen> streamed = null;
        List<Seen> listed = null;
        try {
            streamed = readStreaming(archive);
        } catch (Exception e) {
            failures.add("ZipInputStream rejected " + archive + ": " + e);
        }
        try {
            listed = readCentralDirectory(archive);
        } catch (Exception e) {
            failures.add("ZipFile rejected " + archive + ": " + e);
        }
        if (streamed != null && streamed.size() != expected) {
            failures.add("ZipInputStream read " + streamed.size() + " entries, expected " + expected);
        }
        if (listed != null && listed.size() != expected) {
            failures.add("ZipFile listed " + listed.size() + " entries, expected " + expected);
        }
        if (failures.isEmpty()) {
            for (int i = 0; i < streamed.size(); i++) {
                if (!streamed.get(i).equals(listed.get(i))) {
                    failures.add("entry " + i + " differs: ZipInputStream " + streamed.get(i) + ", ZipFile "
                            + listed.get(i));
                    break;
                }
            }
        }
        if (!failures.isEmpty()) {
            failures.forEach(failure -> System.err.println("FAIL: " + failure));
            System.exit(1);
        }
        long bytes = streamed.stream().mapToLong(Seen::size).sum();
        System.out.println("ok: " + expected + " entries, " + bytes + " bytes (ZipInputStream and ZipFile)");
    }

    private static List<Seen> readStreaming(File archive) throws IOException {
        List<Seen> seen = new ArrayList<>();
        byte[] buffer = new byte[1 << 20];
        try (ZipInputStream zip = new ZipInputStream(new BufferedInputStream(new FileInputStream(archive), 1 << 20))) {
            ZipEntry entry;
            while ((entry = nextEntry(zip, seen)) != null) {
                CRC32 crc = new CRC32();
                long size = 0;
                int n;
                try {
                    while ((n = zip.read(buffer)) > 0) {
                        crc.update(buffer, 0, n);
                        size += n;
                    }
                } catch (IOException e) {
                    throw new IOException("entry #" + seen.size() + " " + entry.getName() + " (" + size
                            + " bytes read): " + e, e);
                }
                // After the entry's end, ZipInputStream has checked size and CRC against the local header or
                // the data descriptor (ZipException otherwise); check them once more against what was read.
                if (entry.getSize() != size || entry.getCrc() != crc.getValue()) {
                    throw new IOException(entry.getName() + ": read " + size + " bytes with CRC "
                            + Long.toHexString(crc.getValue()) + ", the entry says " + entry.getSize()
                            + " bytes with CRC " + Long.toHexString(entry.getCrc()));
                }
                seen.add(new Seen(entry.getName(), size, crc.getValue()));
            }
        }
        return seen;
    }

    private static ZipEntry nextEntry(ZipInputStream zip, List<Seen> seen) throws IOException {
        try {
            return zip.getNextEntry();
        } catch (IOException e) {
            String after = seen.isEmpty() ? "the start" : seen.get(seen.size() - 1).name();
            throw new IOException("entry #" + seen.size() + " (after " + after + "): " + e, e);
        }
    }

    private static List<Seen> readCentralDirectory(File archive) throws IOException {
        List<Seen> seen = new ArrayList<>();
        byte[] buffer = new byte[1 << 20];
        try (ZipFile zip = new ZipFile(archive)) {
            Enumeration<? extends ZipEntry> entries = zip.entries();
            while (entries.hasMoreElements()) {
                ZipEntry entry = entries.nextElement();
                // Opening the entry seeks to its local header (from the central directory's, possibly zip64,
                // offset) and checks its signature; small entries are read whole and their CRC checked.
                try (InputStream in = zip.getInputStream(entry)) {
                    CRC32 crc = new CRC32();
                    long limit = entry.getSize() <= FULL_READ_LIMIT ? Long.MAX_VALUE : buffer.length;
                    long size = 0;
                    int n;
                    while (size < limit && (n = in.read(buffer)) > 0) {
                        crc.update(buffer, 0, n);
                        size += n;
                    }
                    if (limit == Long.MAX_VALUE && (size != entry.getSize() || crc.getValue() != entry.getCrc())) {
                        throw new IOException(entry.getName() + ": read " + size + " bytes with CRC "
                                + Long.toHexString(crc.getValue()) + ", the central directory says "
                                + entry.getSize() + " bytes with CRC " + Long.toHexString(entry.getCrc()));
                    }
                }
                seen.add(new Seen(entry.getName(), entry.getSize(), entry.getCrc()));
            }
        }
        return seen;
    }
}
