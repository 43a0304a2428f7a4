package embedjoin.searchengine;

import java.io.IOException;
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URI;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Comparator;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.stream.Stream;

/**
 * What both engine launchers share: the command line, the wait until the node answers, the
 * one line of stdout, and the stop.
 *
 * Contract: the node listens on 127.0.0.1 on a free port (or {@code --port N}); once it
 * answers, its URL is printed as the one line on stdout (logs go to stderr). It stops,
 * closing the node and deleting a temporary data directory, on SIGTERM or SIGINT, and also
 * on end of stdin with {@code --stop-on-eof} (so a harness that dies takes the engine with
 * it). {@code --data DIR} keeps the data in DIR instead of a temporary directory.
 */
public final class Launcher {
    private static final Duration READY_TIMEOUT = Duration.ofMinutes(3);

    /** One embedded node of some engine. */
    public interface Node {
        /** Builds and starts the node with its home in {@code home}; returns its HTTP port. */
        int start(Path home, int port) throws Exception;

        void close() throws Exception;
    }

    private Launcher() {}

    /**
     * The node settings both engines take: one node on loopback, its own home, no
     * transport port of note, and no disk thresholds (a developer's disk may be nearly
     * full; a test index must still take writes).
     */
    public static Map<String, String> nodeSettings(Path home, int port) {
        return Map.of(
            "path.home", home.toString(),
            "path.data", home.resolve("data").toString(),
            "path.logs", home.resolve("logs").toString(),
            "cluster.name", "embedjoin-search-engine",
            "node.name", "search-engine",
            "discovery.type", "single-node",
            "network.host", "127.0.0.1",
            "http.port", Integer.toString(port),
            "transport.port", "0",
            "cluster.routing.allocation.disk.threshold_enabled", "false");
    }

    public static void main(String[] args, Node node) {
        try {
            run(args, node);
        } catch (Throwable e) {
            e.printStackTrace();
            // The node's threads would keep the JVM alive: exit, which runs the stop hook.
            System.exit(1);
        }
    }

    private static void run(String[] args, Node node) throws Exception {
        int port = 0;
        Path data = null;
        boolean stopOnEof = false;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--port" -> port = Integer.parseInt(args[++i]);
                case "--data" -> data = Path.of(args[++i]).toAbsolutePath();
                case "--stop-on-eof" -> stopOnEof = true;
                default -> {
                    System.err.println("usage: search-engine [--port N] [--data DIR] [--stop-on-eof]");
                    System.exit(2);
                }
            }
        }
        boolean temporary = data == null;
        Path home = temporary ? Files.createTempDirectory("search-engine-") : data;
        Files.createDirectories(home.resolve("config"));

        CountDownLatch stopped = new CountDownLatch(1);
        // Registered before the node starts: however the JVM ends from here on, the node is
        // closed and a temporary home removed.
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                System.err.println("search-engine: error while stopping: " + e);
            }
            if (temporary) {
                delete(home);
            }
            stopped.countDown();
        }, "search-engine-stop"));

        long started = System.nanoTime();
        int httpPort = node.start(home, port);
        String url = "http://127.0.0.1:" + httpPort;
        awaitAnswer(url);
        System.err.printf("search-engine: answering at %s after %.1f s%n", url, (System.nanoTime() - started) / 1e9);
        System.out.println(url);
        System.out.flush();

        if (stopOnEof) {
            Thread watcher = new Thread(() -> {
                try (InputStream in = System.in) {
                    while (in.read() != -1) {
                        // Input is ignored; only its end matters.
                    }
                } catch (IOException ignored) {
                    // A broken stdin is an end too.
                }
                System.exit(0); // runs the stop hook
            }, "search-engine-stdin");
            watcher.setDaemon(true);
            watcher.start();
        }
        stopped.await();
    }

    /**
     * Polls cluster health until it is at least yellow: the HTTP layer is bound before the node
     * has a cluster state, and a client's first index creation must not race the election.
     */
    private static void awaitAnswer(String url) throws Exception {
        long deadline = System.nanoTime() + READY_TIMEOUT.toNanos();
        while (true) {
            try {
                HttpURLConnection connection = (HttpURLConnection) URI.create(url + "/_cluster/health?wait_for_status=yellow&timeout=10s")
                    .toURL()
                    .openConnection();
                connection.setConnectTimeout(1000);
                connection.setReadTimeout(15000);
                int status = connection.getResponseCode();
                connection.disconnect();
                if (status == 200) {
                    return;
                }
            } catch (IOException notYet) {
                // Not answering yet.
            }
            if (System.nanoTime() > deadline) {
                throw new IllegalStateException("the node did not answer at " + url + " within " + READY_TIMEOUT);
            }
            Thread.sleep(100);
        }
    }

    private static void delete(Path dir) {
        try (Stream<Path> paths = Files.walk(dir)) {
            paths.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        } catch (IOException e) {
            System.err.println("search-engine: could not remove " + dir + ": " + e);
        }
    }
}
